"""Control-plane hardening on real parts: a 3-member etcd cluster, two control-plane replicas,
three sim model servers (each with its own --model-dir), a router and Envoy.

Desired state is validated when written; operator writes are single etcd transactions that the
writing replica's own view reflects when the call returns; a deployment record written around
the API is reported, not placed; a model that fails to load on two servers is halted (across a
leader failover) until retried; and status follows etcd's quorum. Tests build on each other in
file order; the destructive ones come last.
"""

from __future__ import annotations

import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc

from services.common import keyspace
from services.common.etcd_client import EtcdClient
from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.conftest import meshctl, running_mesh, wait_for

pytestmark = pytest.mark.e2e

SERVERS = ("a", "b", "c")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("model-dirs")
    dirs = {sid: root / sid for sid in SERVERS}
    for d in dirs.values():
        d.mkdir()
    return dirs


@pytest.fixture(scope="module")
def mesh(tmp_path_factory, model_dirs):
    servers = [ServerPlan(sid, zone=f"zone-{sid}", engine_options=["tokens_per_second=500"],
                          extra_args=["--failure-backoff-s", "5", "--model-dir", str(model_dirs[sid]),
                                      "--label", f"slot={sid}", "--label", "pool=test"])
               for sid in SERVERS]
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("cp-hardening"), base_port=0, lease_ttl=3,
                    etcd_members=3, controlplanes=2, servers=servers,
                    controlplane_args=["--election-ttl", "2", "--health-interval", "0.5",
                                       "--halt-after-failures", "2"])
    with running_mesh(plan) as m:
        yield m


@pytest.fixture(scope="module")
def ctl(mesh):
    return [controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(a))
            for a in mesh.controlplanes]


@pytest.fixture(scope="module")
def api(mesh):
    with grpc.insecure_channel(mesh.envoy) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def etcd_put(endpoints: str, puts: dict[str, bytes]) -> None:
    """Write records around the control plane, as a hand edit or a buggy tool would."""
    async def go() -> None:
        client = EtcdClient(endpoints)
        try:
            for key, value in puts.items():
                await client.put(key, value)
        finally:
            await client.close()
    asyncio.run(go())


def deployment(stub, name: str) -> cp.Deployment | None:
    deps = stub.ListDeployments(cp.ListDeploymentsRequest(), timeout=5).deployments
    return next((d for d in deps if d.spec.name == name), None)


def existing(stub, name: str) -> cp.Deployment:
    found = deployment(stub, name)
    assert found is not None, f"{name} is not deployed"
    return found


def halted(stub, name: str, other_than: int = 0) -> bool:
    d = deployment(stub, name)
    return d is not None and d.halted and d.spec.generation != other_than


def ready(stub, name: str, replicas: int) -> bool:
    d = deployment(stub, name)
    return d is not None and d.ready_replicas == replicas


def ask(api, model: str) -> inference_pb2.GenerateResponse:
    req = inference_pb2.GenerateRequest(model=model, prompt="one two three")
    req.sampling.max_tokens = 3
    return api.Generate(req, timeout=30)


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def test_bad_options_are_refused_when_written(mesh, ctl):
    for options, words in [({"": "x"}, "empty name"), ({"tokens_per_second": "0"}, "tokens_per_second"),
                           ({"tokens_per_second": "nan"}, "finite"), ({"threads": "2"}, "threads")]:
        spec = cp.ModelSpec(name="x", backend="sim", replicas=1, options=options)
        err = refused(lambda s=spec: ctl[0].DeployModel(cp.DeployModelRequest(spec=s), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.details()
    for name in ("..", " ", "a/b"):
        spec = cp.ModelSpec(name=name, backend="sim", replicas=1)
        err = refused(lambda s=spec: ctl[0].DeployModel(cp.DeployModelRequest(spec=s), timeout=10))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in err.details()
    out = meshctl("--controlplane", mesh.controlplane, "model", "deploy", "x", "--backend", "sim",
                  "--option", "=x")
    assert out.returncode == 2 and "key=value" in out.stderr
    out = meshctl("--controlplane", mesh.controlplane, "model", "deploy", "x", "--backend", "sim",
                  "--option", "tokens_per_second=0")
    assert out.returncode == 1 and "tokens_per_second=0 is not allowed" in out.stderr
    out = meshctl("--controlplane", mesh.controlplane, "model", "deploy", "x",
                  "--source", "/etc/passwd")
    assert out.returncode == 1 and "host path" in out.stderr
    assert not ctl[1].ListDeployments(cp.ListDeploymentsRequest(), timeout=5).deployments


def test_concurrent_deploys_of_one_name_make_one_deployment(ctl):
    spec = cp.ModelSpec(name="race", backend="sim", replicas=1)

    def attempt(i: int) -> str:
        try:
            ctl[i % 2].DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)
            return "OK"
        except grpc.RpcError as exc:
            return exc.code().name
    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(attempt, range(8)))
    assert outcomes == ["ALREADY_EXISTS"] * 7 + ["OK"]


def test_writes_are_visible_to_the_writer_when_the_call_returns(ctl):
    for stub in ctl:  # each replica reads its own writes, without waiting
        spec = cp.ModelSpec(name="ryw", backend="sim", replicas=1)
        assert stub.DeployModel(cp.DeployModelRequest(spec=spec), timeout=10).deployment.spec.name
        assert deployment(stub, "ryw") is not None
        resp = stub.ScaleModel(cp.ScaleModelRequest(name="ryw", replicas=2), timeout=10)
        assert resp.deployment.spec.replicas == 2 and existing(stub, "ryw").spec.replicas == 2
        stub.UndeployModel(cp.UndeployModelRequest(name="ryw"), timeout=10)
        assert deployment(stub, "ryw") is None
        err = refused(lambda s=stub: s.UndeployModel(cp.UndeployModelRequest(name="ryw"), timeout=10))
        assert err.code() == grpc.StatusCode.NOT_FOUND
    drained = ctl[0].DrainServer(cp.DrainServerRequest(server_id="c", wait_seconds=1), timeout=10)
    assert drained.server.draining
    assert ctl[0].UndrainServer(cp.UndrainServerRequest(server_id="c"), timeout=10).server.state \
        != cp.SERVING_STATE_DRAINING
    ctl[0].UndeployModel(cp.UndeployModelRequest(name="race"), timeout=10)


def test_servers_are_listed_by_label(mesh, ctl):
    def listed(**labels: str) -> list[str]:
        request = cp.ListServersRequest(labels=labels)
        return [s.info.server_id for s in ctl[0].ListServers(request, timeout=5).servers]
    assert listed(slot="b") == ["b"] and listed(pool="test") == list(SERVERS)
    assert listed(slot="b", pool="other") == []
    out = meshctl("--controlplane", mesh.controlplane, "servers", "--label", "slot=c")
    assert out.returncode == 0 and "pool=test,slot=c" in out.stdout and " a " not in out.stdout


def test_a_record_written_around_the_api_is_reported_not_placed(mesh, ctl, api):
    ctl[0].DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(
        name="good", backend="sim", replicas=3)), timeout=10)
    wait_for(lambda: ready(ctl[0], "good", 3), 60, "good READY on every server")
    pids = mesh.pids()
    evil = cp.ModelSpec(name="evil", backend="sim", replicas=3, options={"": "x"})
    etcd_put(mesh.etcd_endpoints, {keyspace.model_key("evil"): keyspace.encode(evil),
                                   keyspace.MODELS + "junk": b"\xff\xff\xff"})
    wait_for(lambda: deployment(ctl[1], "evil") is not None, 20, "the injected record in the view")
    dep = existing(ctl[1], "evil")
    assert "invalid" in dep.unsatisfied_reason and dep.placed_replicas == 0
    out = meshctl("--controlplane", mesh.controlplane, "models")
    assert "evil" in out.stdout and "invalid" in out.stdout
    for _ in range(10):
        assert ask(api, "good").usage.completion_tokens == 3
    assert mesh.pids() == pids and all(ch.alive() for ch in mesh.children.values())
    err = refused(lambda: ctl[0].RetryModel(cp.RetryModelRequest(name="evil"), timeout=10))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "invalid" in err.details()
    ctl[0].UndeployModel(cp.UndeployModelRequest(name="evil"), timeout=10)


def failed_servers(stub, name: str) -> set[str]:
    d = deployment(stub, name)
    return {f.server_id for f in d.failures} if d is not None else set()


def test_a_model_failing_on_two_servers_is_halted_across_failover_and_retried(mesh, ctl):
    spec = cp.ModelSpec(name="heavy", backend="torch", source="smol.gguf", replicas=1)
    spec.options.update({"dtype": "float32", "warmup": "false", "kv_cache_blocks": "64",
                         "threads": "1"})
    ctl[0].DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)
    wait_for(lambda: halted(ctl[0], "heavy"), 60, "heavy halted after two failed loads")
    dep = existing(ctl[0], "heavy")
    assert len(dep.failures) == 2 and all("not found in the model directories" in f.reason
                                          for f in dep.failures)
    out = meshctl("--controlplane", mesh.controlplane, "status")
    assert out.returncode == 0 and "HALTED" in out.stdout and "meshctl model retry heavy" in out.stdout
    first = failed_servers(ctl[0], "heavy")
    # The halt is in etcd: a new leader keeps it.
    leader = ctl[0].GetLeader(cp.GetLeaderRequest(), timeout=5).leader.replica_id
    mesh.sup.kill(mesh.children[leader])
    survivor = ctl[1] if leader == "controlplane0" else ctl[0]
    wait_for(lambda: survivor.GetLeader(cp.GetLeaderRequest(), timeout=5).leader.replica_id
             not in ("", leader), 30, "a new leader")
    survivor.DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(
        name="marker", backend="sim", replicas=1)), timeout=10)
    wait_for(lambda: ready(survivor, "marker", 1), 30, "the new leader to place a model")
    dep = existing(survivor, "heavy")
    assert dep.halted and failed_servers(survivor, "heavy") == first
    placed = survivor.ListPlacements(cp.ListPlacementsRequest(model="heavy"), timeout=5).placements
    assert {p.server_id for p in placed} <= first  # the third server was never tried
    # A retry is a new load generation: the halt is lifted and loads are tried again (and still
    # fail: the weights are missing), so it halts again on fresh failures.
    generation = dep.spec.generation
    address = mesh.controlplanes[ctl.index(survivor)]
    out = meshctl("--controlplane", address, "model", "retry", "heavy")
    assert out.returncode == 0, out.stderr
    wait_for(lambda: halted(survivor, "heavy", other_than=generation), 60,
             "heavy halted again in its new generation")
    dep = existing(survivor, "heavy")
    assert len(dep.failures) == 2


def live(ctl):
    """A control-plane replica that answers (the failover test killed one)."""
    for stub in ctl:
        try:
            stub.ListDeployments(cp.ListDeploymentsRequest(), timeout=2)
            return stub
        except grpc.RpcError:
            continue
    raise AssertionError("no control-plane replica answers")


@pytest.mark.model
def test_retry_after_the_weights_arrive_loads_the_model(mesh, ctl, api, model_dirs):
    from services.modelserver.torch_engine.weights import embedded_gguf_path

    for folder in model_dirs.values():
        os.symlink(embedded_gguf_path(), folder / "smol.gguf")
    stub = live(ctl)
    stub.RetryModel(cp.RetryModelRequest(name="heavy"), timeout=10)
    wait_for(lambda: ready(stub, "heavy", 1), 180, "heavy READY after the retry")
    assert not existing(stub, "heavy").halted
    answer = ask(api, "heavy")
    assert answer.usage.completion_tokens > 0
    statuses = [m for s in stub.ListServers(cp.ListServersRequest(model="heavy"), timeout=5).servers
                for m in s.models if m.model == "heavy" and m.state == cp.MODEL_STATE_READY]
    assert [(m.backend, m.simulated) for m in statuses] == [("torch", False)]
    stub.UndeployModel(cp.UndeployModelRequest(name="heavy"), timeout=10)


def test_status_follows_etcd_quorum(mesh, ctl):
    stub = live(ctl)
    status = stub.GetClusterStatus(cp.GetClusterStatusRequest(), timeout=15)
    assert not status.degraded and status.leader.replica_id
    for name in ("etcd1", "etcd2"):
        mesh.sup.stop_child(mesh.children[name])
    wait_for(lambda: stub.GetClusterStatus(cp.GetClusterStatusRequest(), timeout=15).degraded, 30,
             "status degraded without quorum")
    degraded = stub.GetClusterStatus(cp.GetClusterStatusRequest(), timeout=15)
    assert not degraded.leader.replica_id and "quorum" in degraded.degraded_reason
    err = refused(lambda: stub.GetLeader(cp.GetLeaderRequest(), timeout=15))
    assert err.code() == grpc.StatusCode.UNAVAILABLE and "quorum" in err.details()
    address = mesh.controlplanes[ctl.index(stub)]
    out = meshctl("--controlplane", address, "-o", "json", "status")
    assert out.returncode == 0 and json.loads(out.stdout)["degraded"] is True
    for i in (1, 2):
        mesh.children[f"etcd{i}"] = mesh.restart_etcd_member(i)
    wait_for(lambda: not stub.GetClusterStatus(cp.GetClusterStatusRequest(), timeout=15).degraded,
             60, "status healthy again with quorum back")
    wait_for(lambda: stub.GetLeader(cp.GetLeaderRequest(), timeout=5).leader.replica_id != "", 30,
             "a leader again")
    leader = stub.GetLeader(cp.GetLeaderRequest(), timeout=5).leader
    assert leader.replica_id in ("controlplane0", "controlplane1")
