"""The control plane on real parts: a 3-member etcd cluster, two control-plane replicas, four sim
model servers in two regions and four zones, a router and Envoy.

Tests run in file order against one mesh and build on each other's state (the order a real
operator's day would take); the destructive ones come last.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path

import grpc
import pytest
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.conftest import meshctl, running_mesh, wait_for

pytestmark = pytest.mark.e2e

MB = 2**20
SERVERS = {"e1": ("east", "east-a"), "e2": ("east", "east-b"),
           "w1": ("west", "west-a"), "w2": ("west", "west-b")}


@pytest.fixture(scope="module")
def hang_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults") / "hang-w2"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, hang_file):
    servers = [ServerPlan(sid, region=region, zone=zone, memory_bytes=1000 * MB,
                          engine_options=["tokens_per_second=500"]
                          + ([f"hang_file={hang_file}"] if sid == "w2" else []),
                          extra_args=["--failure-backoff-s", "5"])
               for sid, (region, zone) in SERVERS.items()]
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("cp-mesh"), base_port=0, lease_ttl=3,
                    etcd_members=3, controlplanes=2, servers=servers,
                    controlplane_args=["--election-ttl", "2", "--health-interval", "0.3",
                                       "--probe-interval", "0.5", "--health-timeout", "1",
                                       "--probe-timeout", "1", "--unhealthy-after", "2",
                                       "--healthy-after", "2"])
    with running_mesh(plan) as m:
        yield m


def cp_stub(address: str) -> controlplane_pb2_grpc.ControlPlaneServiceStub:
    return controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(address))


@pytest.fixture(scope="module")
def ctl(mesh):
    return [cp_stub(a) for a in mesh.controlplanes]


@pytest.fixture(scope="module")
def api(mesh):
    with grpc.insecure_channel(mesh.envoy) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def ask(api, model: str, timeout: float = 20) -> inference_pb2.GenerateResponse:
    req = inference_pb2.GenerateRequest(model=model, prompt="one two three")
    req.sampling.max_tokens = 3
    return api.Generate(req, timeout=timeout)


def placed(stub, model: str, ready_only: bool = True) -> set[str]:
    resp = stub.ListPlacements(cp.ListPlacementsRequest(model=model), timeout=5)
    return {p.server_id for p in resp.placements
            if not ready_only or p.state == cp.MODEL_STATE_READY}


def deployment(stub, model: str) -> cp.Deployment:
    deps = stub.ListDeployments(cp.ListDeploymentsRequest(), timeout=5).deployments
    return next(d for d in deps if d.spec.name == model)


def settled(stub, model: str, replicas: int) -> bool:
    """Exactly `replicas` placements, all READY."""
    return placed(stub, model, ready_only=False) == placed(stub, model) and \
        len(placed(stub, model)) == replicas


def any_cp(ctl):
    """A control-plane replica that answers (one may have been killed)."""
    for stub in ctl:
        try:
            stub.GetLeader(cp.GetLeaderRequest(), timeout=2)
            return stub
        except grpc.RpcError:
            continue
    raise AssertionError("no control-plane replica answers")


def test_one_leader_and_every_replica_answers(mesh, ctl):
    def leaders() -> set[str]:
        return {s.GetLeader(cp.GetLeaderRequest(), timeout=5).leader.replica_id for s in ctl}
    wait_for(lambda: bool(leaders()), 20, "a leader")
    found = leaders()
    assert len(found) == 1 and found.pop() in ("controlplane0", "controlplane1")


@pytest.mark.parametrize("spec, code, words", [
    (cp.ModelSpec(name="x", backend="sim", replicas=-1), grpc.StatusCode.INVALID_ARGUMENT, "replicas"),
    (cp.ModelSpec(name="x", backend="sim", replicas=1, regions=[cp.RegionRequirement(region="mars")]),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown region 'mars'"),
    (cp.ModelSpec(name="x", backend="cobol", replicas=1), grpc.StatusCode.INVALID_ARGUMENT, "backend"),
    (cp.ModelSpec(name="x", backend="torch", source="/no/such/model.gguf", replicas=1),
     grpc.StatusCode.INVALID_ARGUMENT, "not a host path"),
    (cp.ModelSpec(name="a/b", backend="sim", replicas=1), grpc.StatusCode.INVALID_ARGUMENT, "'/'"),
    (cp.ModelSpec(name="x", backend="sim", replicas=1,
                  regions=[cp.RegionRequirement(region="east", min_replicas=2)]),
     grpc.StatusCode.INVALID_ARGUMENT, "minimums"),
])
def test_bad_operator_input_is_refused_and_changes_nothing(ctl, spec, code, words):
    with pytest.raises(grpc.RpcError) as info:
        ctl[0].DeployModel(cp.DeployModelRequest(spec=spec), timeout=5)
    assert info.value.code() == code and words in info.value.details()
    assert not ctl[0].ListDeployments(cp.ListDeploymentsRequest(), timeout=5).deployments


def test_unknown_targets_are_not_found(ctl):
    for call in (lambda: ctl[0].ScaleModel(cp.ScaleModelRequest(name="ghost", replicas=1), timeout=5),
                 lambda: ctl[0].UndeployModel(cp.UndeployModelRequest(name="ghost"), timeout=5),
                 lambda: ctl[0].DrainServer(cp.DrainServerRequest(server_id="ghost"), timeout=5)):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in info.value.details()


def test_routing_policy_defaults_and_edits_through_meshctl(mesh, ctl):
    policy = ctl[0].GetRoutingPolicy(cp.GetRoutingPolicyRequest(), timeout=5).policy
    assert policy.prefer_region and policy.prefer_zone and policy.session_header == "x-session-id"
    out = meshctl("--controlplane", mesh.controlplane, "policy", "set", "--session-header",
                  "x-user")
    assert out.returncode == 0, out.stderr
    policy = ctl[1].GetRoutingPolicy(cp.GetRoutingPolicyRequest(), timeout=5).policy
    assert policy.session_header == "x-user" and policy.prefer_region  # other settings kept
    out = meshctl("--controlplane", mesh.controlplane, "policy", "set", "--spill-utilization", "3")
    assert out.returncode == 1 and "spill_utilization" in out.stderr
    out = meshctl("--controlplane", mesh.controlplane, "policy", "set", "--session-header",
                  "x-session-id")
    assert out.returncode == 0, out.stderr


def test_replicas_spread_over_regions_and_zones(ctl, api):
    spec = cp.ModelSpec(name="alpha", backend="sim", replicas=2, memory_bytes=600 * MB,
                        regions=[cp.RegionRequirement(region="east", min_replicas=1),
                                 cp.RegionRequirement(region="west", min_replicas=1)])
    ctl[1].DeployModel(cp.DeployModelRequest(spec=spec), timeout=5)  # a follower may take writes
    wait_for(lambda: settled(ctl[0], "alpha", 2), 30, "alpha READY twice")
    where = placed(ctl[0], "alpha")
    assert {SERVERS[s][0] for s in where} == {"east", "west"}
    wait_for(lambda: ask(api, "alpha").served_by.server_id in where, 15, "alpha served")
    ctl[0].ScaleModel(cp.ScaleModelRequest(name="alpha", replicas=4), timeout=5)
    wait_for(lambda: settled(ctl[0], "alpha", 4), 30, "alpha on four servers")
    assert Counter(SERVERS[s][1] for s in placed(ctl[0], "alpha")) == Counter(
        {"east-a": 1, "east-b": 1, "west-a": 1, "west-b": 1})


def test_two_models_on_servers_with_memory_for_one_each(ctl, api):
    ctl[0].ScaleModel(cp.ScaleModelRequest(name="alpha", replicas=2), timeout=5)
    wait_for(lambda: settled(ctl[0], "alpha", 2), 30, "alpha back to two")
    spec = cp.ModelSpec(name="beta", backend="sim", replicas=2, memory_bytes=600 * MB)
    ctl[0].DeployModel(cp.DeployModelRequest(spec=spec), timeout=5)
    # The released alpha replicas still sit in memory; loading beta evicts them.
    wait_for(lambda: settled(ctl[0], "beta", 2), 30, "beta READY twice")
    assert not placed(ctl[0], "alpha") & placed(ctl[0], "beta")
    for model in ("alpha", "beta"):
        assert ask(api, model).usage.completion_tokens == 3
    d = deployment(ctl[0], "beta")
    assert (d.placed_replicas, d.ready_replicas, d.unsatisfied_reason) == (2, 2, "")


def test_a_failed_load_is_reported_and_not_retried_in_a_tight_loop(ctl):
    # A valid deployment whose weights no server has (no --model-dir here) fails at load time.
    spec = cp.ModelSpec(name="broken", backend="torch", source="missing.gguf", replicas=1)
    ctl[0].DeployModel(cp.DeployModelRequest(spec=spec), timeout=5)

    def failed_somewhere():
        ps = ctl[0].ListPlacements(cp.ListPlacementsRequest(model="broken"), timeout=5).placements
        return [p for p in ps if p.state == cp.MODEL_STATE_FAILED]
    failures = wait_for(failed_somewhere, 30, "a FAILED report")
    assert "not found in the model directories" in failures[0].reason
    ctl[0].UndeployModel(cp.UndeployModelRequest(name="broken"), timeout=5)
    # Each server it tried keeps its FAILED report for the back-off, so it was tried at most once
    # per server, not in a loop.
    assert len(failures) <= len(SERVERS)


def test_sigkilled_server_models_are_replaced_and_requests_keep_succeeding(mesh, ctl, api):
    with pytest.raises(grpc.RpcError) as info:  # one replica cannot meet two regional minimums
        ctl[0].ScaleModel(cp.ScaleModelRequest(name="alpha", replicas=1), timeout=5)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    ctl[0].ScaleModel(cp.ScaleModelRequest(
        name="alpha", replicas=1, regions=[cp.RegionRequirement(region="east", min_replicas=1),
                                           cp.RegionRequirement(region="west", min_replicas=0)]),
        timeout=5)
    wait_for(lambda: settled(ctl[0], "alpha", 1), 30, "alpha down to one")
    victim = sorted(placed(ctl[0], "beta") - {"w2"})[0]
    mesh.sup.kill(mesh.children[victim])
    for _ in range(20):
        assert ask(api, "beta").served_by.server_id != victim
    wait_for(lambda: settled(ctl[0], "beta", 2) and victim not in placed(ctl[0], "beta"), 40,
             "beta re-placed on a live server")
    # The health checker usually moves it first; the lease ending removes the member itself.
    wait_for(lambda: victim not in {s.info.server_id for s in ctl[0].ListServers(
        cp.ListServersRequest(), timeout=5).servers}, 20, "the dead server's lease to end")


def test_hung_server_is_marked_not_serving_and_recovers(ctl, api, hang_file):
    # w2 accepts connections and keeps its lease, but its engine stops answering.
    wait_for(lambda: any(s.info.server_id == "w2" and s.models for s in
                         ctl[0].ListServers(cp.ListServersRequest(), timeout=5).servers), 30,
             "w2 to hold a model")
    hang_file.touch()
    try:
        def state():
            servers = ctl[0].ListServers(cp.ListServersRequest(), timeout=5).servers
            return {s.info.server_id: s for s in servers}["w2"]
        wait_for(lambda: state().state == cp.SERVING_STATE_NOT_SERVING, 30, "w2 NOT_SERVING")
        assert "probe" in state().health_reason
        def left(model: str) -> bool:
            return "w2" not in placed(any_cp(ctl), model, ready_only=False)
        for model in ("alpha", "beta"):
            wait_for(functools.partial(left, model), 30, f"{model} to leave w2")
            assert ask(api, model).served_by.server_id != "w2"
    finally:
        hang_file.unlink()
    wait_for(lambda: {s.info.server_id: s.state for s in ctl[0].ListServers(
        cp.ListServersRequest(), timeout=5).servers}["w2"] == cp.SERVING_STATE_SERVING, 30,
        "w2 SERVING again")


def test_one_etcd_member_down_is_invisible(mesh, ctl, api):
    mesh.sup.kill(mesh.children["etcd2"])
    for _ in range(10):
        ask(api, "beta")
    # Every server holds one 600 MiB model of its 1000 MiB, so a small model is what fits now.
    spec = cp.ModelSpec(name="epsilon", backend="sim", replicas=2)
    ctl[0].DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)
    wait_for(lambda: settled(ctl[0], "epsilon", 2), 40, "a deploy with one etcd member down")
    status = ctl[0].GetClusterStatus(cp.GetClusterStatusRequest(), timeout=10)
    assert not status.degraded
    assert [m.healthy for m in status.etcd].count(False) == 1


def test_drain_moves_a_replica_once_in_flight_requests_finish(ctl, api):
    before = placed(ctl[0], "epsilon")
    target = sorted(before)[0]
    ctl[0].DrainServer(cp.DrainServerRequest(server_id=target, reason="test", wait_seconds=20),
                       timeout=10)
    # A replacement is placed at once; the drained copy goes once nothing is in flight there.
    wait_for(lambda: settled(ctl[0], "epsilon", 2) and target not in placed(ctl[0], "epsilon"), 40,
             "epsilon to move off the drained server")
    for _ in range(10):
        assert ask(api, "epsilon").served_by.server_id != target
    states = {s.info.server_id: s.state
              for s in ctl[0].ListServers(cp.ListServersRequest(), timeout=5).servers}
    assert states[target] == cp.SERVING_STATE_DRAINING
    ctl[0].UndrainServer(cp.UndrainServerRequest(server_id=target), timeout=10)
    wait_for(lambda: {s.info.server_id: s.state for s in ctl[0].ListServers(
        cp.ListServersRequest(), timeout=5).servers}[target] != cp.SERVING_STATE_DRAINING, 20,
        "the server to take traffic again")


def test_leader_dies_another_leads_and_a_pending_deploy_completes(mesh, ctl):
    leader = ctl[0].GetLeader(cp.GetLeaderRequest(), timeout=5).leader.replica_id
    follower = [s for s, name in zip(ctl, ("controlplane0", "controlplane1"), strict=True) if name != leader][0]
    spec = cp.ModelSpec(name="gamma", backend="sim", replicas=1)
    follower.DeployModel(cp.DeployModelRequest(spec=spec), timeout=5)
    mesh.sup.kill(mesh.children[leader])
    new = wait_for(lambda: follower.GetLeader(cp.GetLeaderRequest(), timeout=5).leader.replica_id
                   != leader and follower.GetLeader(cp.GetLeaderRequest(), timeout=5).leader, 20,
                   "a new leader")
    assert new.replica_id != leader
    wait_for(lambda: settled(follower, "gamma", 1), 30, "the pending deploy to complete")


def test_all_of_etcd_down_data_plane_serves_then_reconciles(mesh, ctl, api):
    stub = any_cp(ctl)
    for name in ("etcd0", "etcd1"):
        mesh.sup.kill(mesh.children[name])
    served = Counter(ask(api, m).served_by.server_id for m in ("alpha", "beta", "epsilon") * 5)
    assert sum(served.values()) == 15
    wait_for(lambda: stub.GetClusterStatus(cp.GetClusterStatusRequest(), timeout=10).degraded, 30,
             "the control plane to report itself degraded")
    for i in range(3):
        mesh.children[f"etcd{i}"] = mesh.restart_etcd_member(i)
    wait_for(lambda: not stub.GetClusterStatus(cp.GetClusterStatusRequest(), timeout=10).degraded,
             60, "etcd back and the control plane reconciled")
    spec = cp.ModelSpec(name="delta", backend="sim", replicas=1)
    wait_for(lambda: stub.DeployModel(cp.DeployModelRequest(spec=spec), timeout=5), 30,
             "a deploy to be accepted again")
    wait_for(lambda: settled(stub, "delta", 1), 60, "delta placed after etcd came back")
    # The router's own watch may still be reconnecting: it answers UNAVAILABLE (retryable) until
    # it has seen delta READY.
    wait_for(lambda: ask(api, "delta").usage.completion_tokens == 3, 30, "the router to serve delta")
