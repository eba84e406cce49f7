"""The placement planner: spread, minimums, memory, stability, failover inputs."""

from collections import Counter

from services.controlplane.placement import ModelRequest, Server, plan

GIB = 2**30


def four_servers(memory=0):
    return [Server("e1", "east", "east-a", memory), Server("e2", "east", "east-b", memory),
            Server("w1", "west", "west-a", memory), Server("w2", "west", "west-b", memory)]


def zones_of(servers, placed):
    by_id = {s.server_id: s for s in servers}
    return Counter(by_id[s].zone for s in placed)


def test_replicas_spread_over_zones_first():
    servers = four_servers()
    p = plan([ModelRequest("m", 4)], servers, {})
    assert p.placements["m"] == {"e1", "e2", "w1", "w2"}
    p = plan([ModelRequest("m", 2)], servers, {})
    regions = Counter({"e": 0, "w": 0})
    regions.update(s[0] for s in p.placements["m"])
    assert regions == Counter({"e": 1, "w": 1})  # zones tie, so regions decide: one each
    assert not p.unsatisfied


def test_zone_is_shared_only_when_no_other_zone_has_room():
    servers = [Server("a1", "r", "a"), Server("a2", "r", "a"), Server("b1", "r", "b")]
    p = plan([ModelRequest("m", 2)], servers, {})
    assert zones_of(servers, p.placements["m"]) == Counter({"a": 1, "b": 1})
    p = plan([ModelRequest("m", 3)], servers, {})
    assert zones_of(servers, p.placements["m"]) == Counter({"a": 2, "b": 1})


def test_region_minimums_are_met_first_and_regions_are_restricted():
    servers = four_servers()
    p = plan([ModelRequest("m", 2, region_minimums=(("west", 2),))], servers, {})
    assert p.placements["m"] == {"w1", "w2"}
    p = plan([ModelRequest("m", 3, region_minimums=(("east", 1), ("west", 0)))], servers, {})
    assert len(p.placements["m"]) == 3
    assert any(s.startswith("e") for s in p.placements["m"])


def test_memory_budget_is_never_exceeded():
    servers = [Server("s1", "r", "a", GIB), Server("s2", "r", "b", GIB)]
    models = [ModelRequest("big", 2, memory_bytes=GIB), ModelRequest("other", 1, memory_bytes=GIB)]
    p = plan(models, servers, {})
    assert p.placements["big"] == {"s1", "s2"}
    assert p.placements["other"] == set()
    assert "no more usable servers" in p.unsatisfied["other"]


def test_two_models_with_memory_for_one_each_share_the_fleet():
    servers = four_servers(memory=GIB)
    models = [ModelRequest("a", 2, memory_bytes=GIB), ModelRequest("b", 2, memory_bytes=GIB)]
    p = plan(models, servers, {})
    assert len(p.placements["a"]) == 2 and len(p.placements["b"]) == 2
    assert not p.placements["a"] & p.placements["b"]


def test_plan_is_stable_when_nothing_changed():
    servers = four_servers()
    first = plan([ModelRequest("m", 2)], servers, {})
    again = plan([ModelRequest("m", 2)], servers, first.placements)
    assert again.placements == first.placements


def test_dead_unhealthy_and_failed_servers_lose_their_replicas_which_are_replaced():
    servers = four_servers()
    current = {"m": {"e1", "w1"}}
    gone = [s for s in servers if s.server_id != "e1"]
    p = plan([ModelRequest("m", 2)], gone, current)
    assert "w1" in p.placements["m"] and len(p.placements["m"]) == 2 and "e1" not in p.placements["m"]
    sick = [Server(s.server_id, s.region, s.zone, usable=s.server_id != "w1") for s in servers]
    p = plan([ModelRequest("m", 2)], sick, current)
    assert "w1" not in p.placements["m"] and len(p.placements["m"]) == 2
    p = plan([ModelRequest("m", 2)], servers, current, failed={("w1", "m")})
    assert "w1" not in p.placements["m"] and len(p.placements["m"]) == 2


def test_draining_server_keeps_its_replica_until_released_but_a_replacement_is_placed():
    servers = [Server("e1", "east", "east-a", draining=True), Server("e2", "east", "east-b"),
               Server("w1", "west", "west-a")]
    p = plan([ModelRequest("m", 1)], servers, {"m": {"e1"}})
    assert p.placements["m"] == {"e1", "e2"} or p.placements["m"] == {"e1", "w1"}
    released = [Server("e1", "east", "east-a", usable=False, draining=True)] + servers[1:]
    p = plan([ModelRequest("m", 1)], released, p.placements)
    assert "e1" not in p.placements["m"] and len(p.placements["m"]) == 1


def test_scale_down_keeps_regional_minimums_and_trims_crowded_zones():
    servers = four_servers()
    current = {"m": {"e1", "e2", "w1", "w2"}}
    p = plan([ModelRequest("m", 2, region_minimums=(("east", 1), ("west", 1)))], servers, current)
    assert len(p.placements["m"]) == 2
    assert {s[0] for s in p.placements["m"]} == {"e", "w"}


def test_unsatisfiable_request_says_why():
    p = plan([ModelRequest("m", 3)], [Server("only", "r", "z")], {})
    assert p.placements["m"] == {"only"}
    assert p.unsatisfied["m"].startswith("1 of 3 replicas placed")
