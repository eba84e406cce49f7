"""The control plane on real parts: a 3-member etcd cluster, two control-plane replicas, four sim
model servers in two regions and four zones, a router and Envoy.

Every test sets up what it needs and leaves the mesh as it found it, so each passes alone and in
any order: it deploys its own models (undeployed on the way out) and undoes what it breaks
(drains, a hung engine, a stopped etcd member, the routing policy). Tests that kill a server, the
leader or all of etcd get a fresh mesh of the same shape (`own_mesh`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, running_mesh, wait_for

pytestmark = pytest.mark.e2e

MB = 2**20
SERVERS = {"e1": ("east", "east-a"), "e2": ("east", "east-b"),
           "w1": ("west", "west-a"), "w2": ("west", "west-b")}
Stubs = list[controlplane_pb2_grpc.ControlPlaneServiceStub]


def plan(data_dir: Path, hang_file: Path) -> MeshPlan:
    servers = [ServerPlan(sid, region=region, zone=zone, memory_bytes=1000 * MB,
                          engine_options=["tokens_per_second=500"]
                          + ([f"hang_file={hang_file}"] if sid == "w2" else []),
                          extra_args=["--failure-backoff-s", "5"])
               for sid, (region, zone) in SERVERS.items()]
    return MeshPlan(data_dir=data_dir, base_port=0, lease_ttl=3, etcd_members=3, controlplanes=2,
                    servers=servers,
                    controlplane_args=["--election-ttl", "2", "--health-interval", "0.3",
                                       "--probe-interval", "0.5", "--health-timeout", "1",
                                       "--probe-timeout", "1", "--unhealthy-after", "2",
                                       "--healthy-after", "2"])


@pytest.fixture(scope="module")
def hang_file(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults") / "hang-w2"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, hang_file: Path) -> Iterator[LocalMesh]:
    with running_mesh(plan(tmp_path_factory.mktemp("cp-mesh"), hang_file)) as m:
        yield m


@pytest.fixture
def own_mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    """A mesh of the same shape for one test that kills some of its processes."""
    with running_mesh(plan(tmp_path / "mesh", tmp_path / "hang-w2")) as m:
        yield m


@contextmanager
def cp_stubs(mesh: LocalMesh) -> Iterator[Stubs]:
    channels = [grpc.insecure_channel(a) for a in mesh.controlplanes]
    try:
        yield [controlplane_pb2_grpc.ControlPlaneServiceStub(ch) for ch in channels]
    finally:
        for ch in channels:
            ch.close()


@contextmanager
def api_stub(mesh: LocalMesh) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(mesh.envoy) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


@pytest.fixture(scope="module")
def ctl(mesh: LocalMesh) -> Iterator[Stubs]:
    with cp_stubs(mesh) as stubs:
        yield stubs


@pytest.fixture(scope="module")
def api(mesh: LocalMesh) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with api_stub(mesh) as stub:
        yield stub


@pytest.fixture
def own_ctl(own_mesh: LocalMesh) -> Iterator[Stubs]:
    with cp_stubs(own_mesh) as stubs:
        yield stubs


@pytest.fixture
def own_api(own_mesh: LocalMesh) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with api_stub(own_mesh) as stub:
        yield stub


def generate(api, model: str, timeout: float = 20) -> inference_pb2.GenerateResponse:
    return api.Generate(ask(max_tokens=3, model=model), timeout=timeout)


def placed(stub, model: str, ready_only: bool = True) -> set[str]:
    resp = stub.ListPlacements(cp.ListPlacementsRequest(model=model), timeout=5)
    return {p.server_id for p in resp.placements
            if not ready_only or p.state == cp.MODEL_STATE_READY}


def deployment(stub, model: str) -> cp.Deployment:
    deps = stub.ListDeployments(cp.ListDeploymentsRequest(), timeout=5).deployments
    return next(d for d in deps if d.spec.name == model)


def deployed_names(stub) -> set[str]:
    return {d.spec.name for d in stub.ListDeployments(cp.ListDeploymentsRequest(), timeout=5).deployments}


def settled(stub, model: str, replicas: int) -> bool:
    """Exactly `replicas` placements, all READY."""
    return placed(stub, model, ready_only=False) == placed(stub, model) and \
        len(placed(stub, model)) == replicas


def any_cp(ctl: Stubs):
    """A control-plane replica that answers (one may have been killed)."""
    for stub in ctl:
        try:
            stub.GetLeader(cp.GetLeaderRequest(), timeout=2)
            return stub
        except grpc.RpcError:
            continue
    raise AssertionError("no control-plane replica answers")


def server_states(stub) -> dict[str, int]:
    return {s.info.server_id: s.state
            for s in stub.ListServers(cp.ListServersRequest(), timeout=5).servers}


def leader_of(stub) -> str:
    return stub.GetLeader(cp.GetLeaderRequest(), timeout=5).leader.replica_id


@contextmanager
def deployed(ctl: Stubs, spec: cp.ModelSpec, replicas: int | None = None) -> Iterator[str]:
    """Deploy `spec` (waiting until `replicas` placements are READY, when given); undeploy it
    afterwards and wait until no placement is left, so its memory is free for the next test."""
    any_cp(ctl).DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)
    try:
        if replicas is not None:
            wait_for(lambda: settled(any_cp(ctl), spec.name, replicas), 40,
                     f"{spec.name} READY on {replicas} server(s)")
        yield spec.name
    finally:
        any_cp(ctl).UndeployModel(cp.UndeployModelRequest(name=spec.name), timeout=10)
        wait_for(lambda: not placed(any_cp(ctl), spec.name, ready_only=False), 30,
                 f"{spec.name}'s placements to go")


def test_one_leader_and_every_replica_answers(ctl):
    def one_leader() -> set[str]:
        leaders = {leader_of(s) for s in ctl}
        return leaders if len(leaders) == 1 and "" not in leaders else set()
    leaders = wait_for(one_leader, 20, "one leader that every replica names")
    assert leaders.pop() in ("controlplane0", "controlplane1")


@pytest.mark.parametrize("spec, code, words", [
    (cp.ModelSpec(name="x", backend="sim", replicas=-1), grpc.StatusCode.INVALID_ARGUMENT, "replicas"),
    (cp.ModelSpec(name="x", backend="sim", replicas=1, regions=[cp.RegionRequirement(region="mars")]),
     grpc.StatusCode.INVALID_ARGUMENT, "unknown region 'mars'"),
    (cp.ModelSpec(name="x", backend="cobol", replicas=1), grpc.StatusCode.INVALID_ARGUMENT, "backend"),
    (cp.ModelSpec(name="x", backend="torch", source="/no/such/model.gguf", replicas=1),
     grpc.StatusCode.INVALID_ARGUMENT, "does not exist"),
    (cp.ModelSpec(name="a/b", backend="sim", replicas=1), grpc.StatusCode.INVALID_ARGUMENT, "'/'"),
    (cp.ModelSpec(name="x", backend="sim", replicas=1,
                  regions=[cp.RegionRequirement(region="east", min_replicas=2)]),
     grpc.StatusCode.INVALID_ARGUMENT, "minimums"),
])
def test_bad_operator_input_is_refused_and_changes_nothing(ctl, spec, code, words):
    before = deployed_names(ctl[0])
    with pytest.raises(grpc.RpcError) as info:
        ctl[0].DeployModel(cp.DeployModelRequest(spec=spec), timeout=5)
    assert info.value.code() == code and words in info.value.details()
    assert deployed_names(ctl[0]) == before and spec.name not in before


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
    try:
        out = meshctl("--controlplane", mesh.controlplane, "policy", "set", "--session-header",
                      "x-user")
        assert out.returncode == 0, out.stderr
        policy = ctl[1].GetRoutingPolicy(cp.GetRoutingPolicyRequest(), timeout=5).policy
        assert policy.session_header == "x-user" and policy.prefer_region  # other settings kept
        out = meshctl("--controlplane", mesh.controlplane, "policy", "set", "--spill-utilization", "3")
        assert out.returncode == 1 and "spill_utilization" in out.stderr
    finally:
        out = meshctl("--controlplane", mesh.controlplane, "policy", "set", "--session-header",
                      "x-session-id")
        assert out.returncode == 0, out.stderr


def test_replicas_spread_over_regions_and_zones(ctl, api):
    regions = [cp.RegionRequirement(region="east", min_replicas=1),
               cp.RegionRequirement(region="west", min_replicas=1)]
    spec = cp.ModelSpec(name="spread", backend="sim", replicas=2, memory_bytes=600 * MB, regions=regions)
    # A follower may take writes: deploy through the second replica.
    with deployed([ctl[1]], spec, replicas=2):
        where = placed(ctl[0], "spread")
        assert {SERVERS[s][0] for s in where} == {"east", "west"}
        wait_for(lambda: generate(api, "spread").served_by.server_id in where, 15, "spread served")
        ctl[0].ScaleModel(cp.ScaleModelRequest(name="spread", replicas=4), timeout=5)
        wait_for(lambda: settled(ctl[0], "spread", 4), 30, "spread on four servers")
        assert Counter(SERVERS[s][1] for s in placed(ctl[0], "spread")) == Counter(
            {"east-a": 1, "east-b": 1, "west-a": 1, "west-b": 1})
        with pytest.raises(grpc.RpcError) as info:  # one replica cannot meet two regional minimums
            ctl[0].ScaleModel(cp.ScaleModelRequest(name="spread", replicas=1), timeout=5)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        ctl[0].ScaleModel(cp.ScaleModelRequest(
            name="spread", replicas=1, regions=[cp.RegionRequirement(region="east", min_replicas=1),
                                                cp.RegionRequirement(region="west", min_replicas=0)]),
            timeout=5)
        wait_for(lambda: settled(ctl[0], "spread", 1), 30, "spread down to one")
        assert {SERVERS[s][0] for s in placed(ctl[0], "spread")} == {"east"}


def test_two_models_on_servers_with_memory_for_one_each(ctl, api):
    first = cp.ModelSpec(name="mem-a", backend="sim", replicas=4, memory_bytes=600 * MB)
    second = cp.ModelSpec(name="mem-b", backend="sim", replicas=2, memory_bytes=600 * MB)
    with deployed(ctl, first, replicas=4):
        ctl[0].ScaleModel(cp.ScaleModelRequest(name="mem-a", replicas=2), timeout=5)
        wait_for(lambda: settled(ctl[0], "mem-a", 2), 30, "mem-a back to two")
        # The released mem-a replicas still sit in memory; loading mem-b evicts them.
        with deployed(ctl, second, replicas=2):
            assert not placed(ctl[0], "mem-a") & placed(ctl[0], "mem-b")
            for model in ("mem-a", "mem-b"):
                assert generate(api, model).usage.completion_tokens == 3
            d = deployment(ctl[0], "mem-b")
            assert (d.placed_replicas, d.ready_replicas, d.unsatisfied_reason) == (2, 2, "")


def test_a_failed_load_is_reported_and_not_retried_in_a_tight_loop(ctl):
    spec = cp.ModelSpec(name="broken", backend="sim", replicas=1)
    spec.options["no_such_option"] = "1"
    with deployed(ctl, spec):
        def failed_somewhere():
            ps = ctl[0].ListPlacements(cp.ListPlacementsRequest(model="broken"), timeout=5).placements
            return [p for p in ps if p.state == cp.MODEL_STATE_FAILED]
        failures = wait_for(failed_somewhere, 30, "a FAILED report")
        assert "no_such_option" in failures[0].reason
    # Each server it tried keeps its FAILED report for the back-off, so it was tried at most once
    # per server, not in a loop.
    assert len(failures) <= len(SERVERS)


def test_sigkilled_server_models_are_replaced_and_requests_keep_succeeding(own_mesh, own_ctl, own_api):
    ctl, api = own_ctl, own_api
    with deployed(ctl, cp.ModelSpec(name="beta", backend="sim", replicas=2), replicas=2):
        victim = sorted(placed(ctl[0], "beta"))[0]
        own_mesh.sup.kill(own_mesh.children[victim])
        for _ in range(20):
            assert generate(api, "beta").served_by.server_id != victim
        wait_for(lambda: settled(ctl[0], "beta", 2) and victim not in placed(ctl[0], "beta"), 40,
                 "beta re-placed on a live server")
        # The health checker usually moves it first; the lease ending removes the member itself.
        wait_for(lambda: victim not in server_states(ctl[0]), 20, "the dead server's lease to end")


def test_hung_server_is_marked_not_serving_and_recovers(ctl, api, hang_file):
    # w2 accepts connections and keeps its lease, but its engine stops answering.
    spec = cp.ModelSpec(name="hang", backend="sim", replicas=2,
                        regions=[cp.RegionRequirement(region="west", min_replicas=2)])
    with deployed(ctl, spec, replicas=2):
        assert placed(ctl[0], "hang") == {"w1", "w2"}
        hang_file.touch()
        try:
            def w2_not_serving() -> cp.ServerStatus | None:
                servers = ctl[0].ListServers(cp.ListServersRequest(), timeout=5).servers
                w2 = {s.info.server_id: s for s in servers}["w2"]
                return w2 if w2.state == cp.SERVING_STATE_NOT_SERVING else None
            verdict = wait_for(w2_not_serving, 30, "w2 NOT_SERVING")
            assert "probe" in verdict.health_reason
            wait_for(lambda: "w2" not in placed(ctl[0], "hang", ready_only=False), 30,
                     "hang to leave w2")
            assert generate(api, "hang").served_by.server_id != "w2"
        finally:
            hang_file.unlink()
        wait_for(lambda: server_states(ctl[0])["w2"] == cp.SERVING_STATE_SERVING, 30,
                 "w2 SERVING again")


def test_one_etcd_member_down_is_invisible(mesh, ctl, api):
    with deployed(ctl, cp.ModelSpec(name="quorum-a", backend="sim", replicas=2), replicas=2):
        mesh.sup.kill(mesh.children["etcd2"])
        try:
            for _ in range(10):
                generate(api, "quorum-a")
            spec = cp.ModelSpec(name="quorum-b", backend="sim", replicas=2)
            with deployed(ctl, spec, replicas=2):  # a deploy with one etcd member down
                status = ctl[0].GetClusterStatus(cp.GetClusterStatusRequest(), timeout=10)
                assert not status.degraded
                assert [m.healthy for m in status.etcd].count(False) == 1
        finally:
            mesh.children["etcd2"] = mesh.restart_etcd_member(2)
            wait_for(lambda: all(m.healthy for m in ctl[0].GetClusterStatus(
                cp.GetClusterStatusRequest(), timeout=10).etcd), 60, "etcd2 back")


def test_drain_moves_a_replica_once_in_flight_requests_finish(ctl, api):
    with deployed(ctl, cp.ModelSpec(name="drained", backend="sim", replicas=2), replicas=2):
        target = sorted(placed(ctl[0], "drained"))[0]
        ctl[0].DrainServer(cp.DrainServerRequest(server_id=target, reason="test", wait_seconds=20),
                           timeout=10)
        try:
            # A replacement is placed at once; the drained copy goes once nothing is in flight there.
            wait_for(lambda: settled(ctl[0], "drained", 2) and target not in placed(ctl[0], "drained"),
                     40, "drained to move off the drained server")
            for _ in range(10):
                assert generate(api, "drained").served_by.server_id != target
            assert server_states(ctl[0])[target] == cp.SERVING_STATE_DRAINING
        finally:
            ctl[0].UndrainServer(cp.UndrainServerRequest(server_id=target), timeout=10)
        wait_for(lambda: server_states(ctl[0])[target] == cp.SERVING_STATE_SERVING, 20,
                 "the server to take traffic again")


def test_leader_dies_another_leads_and_a_pending_deploy_completes(own_mesh, own_ctl):
    ctl = own_ctl
    leader = wait_for(lambda: leader_of(ctl[0]), 20, "a leader")
    follower = [s for s, name in zip(ctl, ("controlplane0", "controlplane1"), strict=True)
                if name != leader][0]
    spec = cp.ModelSpec(name="gamma", backend="sim", replicas=1)
    follower.DeployModel(cp.DeployModelRequest(spec=spec), timeout=5)
    own_mesh.sup.kill(own_mesh.children[leader])
    new = wait_for(lambda: leader_of(follower) not in ("", leader) and leader_of(follower), 20,
                   "a new leader")
    assert new != leader
    wait_for(lambda: settled(follower, "gamma", 1), 30, "the pending deploy to complete")


def test_all_of_etcd_down_data_plane_serves_then_reconciles(own_mesh, own_ctl, own_api):
    mesh, ctl, api = own_mesh, own_ctl, own_api
    for name in ("alpha", "beta"):
        ctl[0].DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(name=name, backend="sim", replicas=2)),
                           timeout=5)
    wait_for(lambda: settled(ctl[0], "alpha", 2) and settled(ctl[0], "beta", 2), 40, "both READY")
    for i in range(3):
        mesh.sup.kill(mesh.children[f"etcd{i}"])
    served = Counter(generate(api, m).served_by.server_id for m in ("alpha", "beta") * 8)
    assert sum(served.values()) == 16
    wait_for(lambda: ctl[0].GetClusterStatus(cp.GetClusterStatusRequest(), timeout=10).degraded, 30,
             "the control plane to report itself degraded")
    for i in range(3):
        mesh.children[f"etcd{i}"] = mesh.restart_etcd_member(i)
    wait_for(lambda: not ctl[0].GetClusterStatus(cp.GetClusterStatusRequest(), timeout=10).degraded,
             60, "etcd back and the control plane reconciled")
    spec = cp.ModelSpec(name="delta", backend="sim", replicas=1)
    wait_for(lambda: ctl[0].DeployModel(cp.DeployModelRequest(spec=spec), timeout=5), 30,
             "a deploy to be accepted again")
    wait_for(lambda: settled(ctl[0], "delta", 1), 60, "delta placed after etcd came back")
    assert generate(api, "delta").usage.completion_tokens == 3
