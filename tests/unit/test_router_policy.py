"""The routing pipeline's stages and policies, on fake endpoints."""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
from meshserve.v1 import controlplane_pb2 as cp

from services.router.policy import RouteRequest, Settings, affinity, candidates, locality, make_policy, scoring
from services.router.policy.pipeline import Pick, Policy
from services.router.policy.prefix import PrefixIndex, block_hashes, render
from services.router.policy.types import Load


@dataclass
class FakeEndpoint:
    server_id: str
    region: str = "local"
    zone: str = "a"
    in_flight: int = 0
    queue_depth: int = 0
    max_running: int = 10
    kv_used: int = 0
    kv_total: int = 100
    ejected_until: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def replica_id(self) -> str:
        return f"{self.server_id}/m"

    def load(self) -> Load:
        return Load(in_flight=self.in_flight, queue_depth=self.queue_depth,
                    max_running=self.max_running, kv_blocks_used=self.kv_used,
                    kv_blocks_total=self.kv_total)

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until


E = FakeEndpoint


def home_of(es: list[FakeEndpoint], session: str, s: Settings) -> FakeEndpoint:
    """affinity.choose, which must find a server here."""
    chosen = affinity.choose(es, session, s)
    assert chosen is not None, f"no server chosen for {session!r}"
    return chosen


def must_pick(policy: Policy, es: list[FakeEndpoint], r: RouteRequest, s: Settings) -> Pick[FakeEndpoint]:
    """policy.pick, which must find a server here."""
    pick = policy.pick(es, r, s)
    assert pick is not None, f"{policy} picked nothing"
    return pick


def req(**kw) -> RouteRequest:
    kw.setdefault("model", "m")
    kw.setdefault("region", "local")
    return RouteRequest(**kw)


# --- settings -----------------------------------------------------------------------------------

def test_settings_defaults_and_proto():
    assert Settings.from_proto(None) == Settings()
    s = Settings.from_proto(cp.RoutingPolicy(session_header="x-user", spill_utilization=0.5,
                                             prefer_region=True))
    assert s.session_header == "x-user" and s.spill_utilization == 0.5
    assert s.affinity_load_bound == 1.25 and s.prefer_region and not s.prefer_zone


# --- candidates ---------------------------------------------------------------------------------

def test_candidates_skip_tried_and_ejected_unless_nothing_else():
    later = time.monotonic() + 60
    es = [E("a", ejected_until=later), E("b"), E("c")]
    assert [e.server_id for e in candidates.usable(es, {"c"})] == ["b"]
    assert [e.server_id for e in candidates.usable(es, {"b", "c"})] == ["a"]
    assert candidates.usable(es, {"a", "b", "c"}) == []


# --- locality -----------------------------------------------------------------------------------

def test_locality_prefers_region_then_zone_and_spills_only_when_saturated():
    es = [E("eu-a", "eu", "a"), E("eu-b", "eu", "b"), E("us-a", "us", "a")]
    s = Settings()
    tier, spilled = locality.select(es, req(region="eu", zone="b"), s)
    assert [e.server_id for e in tier] == ["eu-b"] and not spilled
    es[1].in_flight = 9  # 0.9 of 10: saturated at the default spill_utilization
    tier, spilled = locality.select(es, req(region="eu", zone="b"), s)
    assert {e.server_id for e in tier} == {"eu-a", "eu-b"} and spilled
    es[0].in_flight = 10
    tier, spilled = locality.select(es, req(region="eu", zone="b"), s)
    assert {e.server_id for e in tier} == {"eu-a", "eu-b", "us-a"} and spilled
    es[2].in_flight = 10  # everything saturated: stay local, admission control decides
    tier, spilled = locality.select(es, req(region="eu", zone="b"), s)
    assert [e.server_id for e in tier] == ["eu-b"] and not spilled


def test_locality_unknown_region_and_switched_off():
    es = [E("eu-a", "eu"), E("us-a", "us")]
    tier, spilled = locality.select(es, req(region="mars"), Settings())
    assert len(tier) == 2 and not spilled  # nothing local: every server is the first tier
    tier, _ = locality.select(es, req(region="eu"), Settings(prefer_region=False))
    assert len(tier) == 2


# --- affinity -----------------------------------------------------------------------------------

def test_rendezvous_is_stable_and_moves_only_the_leavers_sessions():
    es = [E(f"s{i}") for i in range(5)]
    s = Settings()
    before = {f"sess{i}": home_of(es, f"sess{i}", s).server_id for i in range(400)}
    # The same answer from a fresh computation (another router replica) and in any order.
    assert before == {k: home_of(list(reversed(es)), k, s).server_id for k in before}
    assert len(set(before.values())) == 5
    remaining = [e for e in es if e.server_id != "s2"]
    after = {k: home_of(remaining, k, s).server_id for k in before}
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k, v in before.items() if v == "s2"}


def test_affinity_yields_to_saturation_and_load_bound():
    es = [E("a"), E("b"), E("c")]
    s = Settings()
    home = home_of(es, "sess", s)
    home.in_flight = 9  # saturated (0.9 >= spill_utilization)
    second = affinity.choose(es, "sess", s)
    assert second is not None and second is not home
    home.in_flight = 4  # not saturated, but above 1.25 x average (with one smoothing slot each)
    assert affinity.choose(es, "sess", s) is not home
    home.in_flight = 1  # a little busier than the others: stays home
    assert affinity.choose(es, "sess", s) is home
    for e in es:
        e.in_flight = 10
    assert affinity.choose(es, "sess", s) is None


# --- prefix -------------------------------------------------------------------------------------

class Msg:
    def __init__(self, role, content):
        self.role, self.content = role, content


def test_block_hashes_are_chained_over_full_blocks():
    assert block_hashes("x" * 63, 64) == []
    a = block_hashes("x" * 64 + "y" * 64 + "z", 64)
    b = block_hashes("x" * 64 + "w" * 64, 64)
    assert len(a) == 2 and a[0] == b[0] and a[1] != b[1]
    # Same second block after a different first block: a different hash (it covers the prefix).
    assert block_hashes("q" * 64 + "y" * 64, 64)[1] != a[1]


def test_render_makes_next_turn_extend_the_previous():
    turn1 = [Msg("system", "S" * 100), Msg("user", "hello")]
    turn2 = turn1 + [Msg("assistant", "hi"), Msg("user", "more")]
    assert render("", turn2).startswith(render("", turn1))
    assert render("plain", []) == "plain"


def test_prefix_index_match_record_lru_and_forget():
    idx = PrefixIndex(block_chars=4, capacity_blocks=3)
    h = block_hashes("aaaabbbbccccdddd", 4)
    idx.record("s1", h[:2])
    assert idx.match("s1", h) == 2 and idx.match("s2", h) == 0
    idx.record("s1", h[2:])  # capacity 3: the oldest block goes, so the chain breaks at 0
    assert idx.match("s1", h) == 0
    idx.forget("s1")
    assert idx.replicas() == set()
    with pytest.raises(ValueError):
        PrefixIndex(block_chars=0)


# --- scoring ------------------------------------------------------------------------------------

def test_scoring_prefers_cached_prefix_until_load_outweighs_it():
    idx = PrefixIndex(block_chars=8)
    r = req(text="z" * 8 * 20)  # 20 blocks
    es = [E("a"), E("b"), E("c")]
    idx.record("b/m", r.block_hashes(8))
    w = scoring.Weights()
    chosen, reason = scoring.choose(es, r, idx, w, random.Random(1))
    assert chosen.server_id == "b" and reason == "prefix"
    es[1].in_flight = 5  # 5 x 8 = 40 blocks of load > 20 cached blocks
    chosen, reason = scoring.choose(es, r, idx, w, random.Random(1))
    assert chosen.server_id != "b" and reason == "load"


def test_scoring_without_cache_is_two_choices_on_load():
    idx = PrefixIndex()
    es = [E("a", in_flight=5), E("b", in_flight=0), E("c", in_flight=5)]
    rng = random.Random(3)
    picks = Counter(scoring.choose(es, req(text="short"), idx, scoring.Weights(), rng)[0].server_id
                    for _ in range(300))
    # b wins whenever it is one of the two sampled (2/3 of the time); never the worst always.
    assert picks["b"] > 150 and picks["a"] + picks["c"] > 0


# --- policies -----------------------------------------------------------------------------------

def test_meshserve_policy_reasons():
    p = make_policy("meshserve")
    es = [E("eu-a", "eu"), E("us-a", "us")]
    s = Settings()
    pick = must_pick(p, es, req(region="eu", session="u1"), s)
    assert pick.endpoint.server_id == "eu-a" and pick.reason == "affinity"
    es[0].in_flight = 10
    pick = must_pick(p, es, req(region="eu", session="u1"), s)
    assert pick.endpoint.server_id == "us-a" and pick.reason == "spill"
    es[0].in_flight = 0
    r = req(region="eu", text="p" * 640)
    assert must_pick(p, es, r, s).reason == "load"
    p.sent("eu-a/m", r)
    assert must_pick(p, es, req(region="eu", text="p" * 640), s).reason == "prefix"
    assert p.pick(es, r, s, exclude={"eu-a", "us-a"}) is None


def test_baselines():
    es = [E("a", in_flight=2), E("b", in_flight=1), E("c", in_flight=3)]
    ll = make_policy("least_load")
    assert must_pick(ll, es, req(), Settings()).endpoint.server_id == "b"
    rr = make_policy("round_robin")
    seq = [must_pick(rr, es, req(session="x"), Settings()).endpoint.server_id for _ in range(6)]
    assert seq == ["a", "b", "c", "a", "b", "c"]
    with pytest.raises(ValueError, match="unknown routing policy"):
        make_policy("fastest")
