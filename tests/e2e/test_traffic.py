"""Traffic policy on real processes (etcd, control plane, two routers, three sim servers, Envoy):
versions and aliases, splits, refused records, a canary rolled back on injected errors and one
promoted step by step, fallback chains, rules, ensembles, and the KServe endpoint.

Each test deploys its own models under its own names, so each passes alone and in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Iterator

import grpc
import pytest
from inference import grpc_service_pb2 as kserve_pb2
from inference import grpc_service_pb2_grpc as kserve_grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc, traffic_pb2_grpc
from meshserve.v1 import traffic_pb2 as tp

from services.common import keyspace
from services.common.etcd_client import EtcdClient
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, running_mesh, wait_for

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[LocalMesh]:
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("traffic"), base_port=0, lease_ttl=3, routers=2,
                    servers=[ServerPlan(f"s{i}", zone=f"z{i}") for i in range(3)])
    with running_mesh(plan) as m:
        yield m


class Clients:
    def __init__(self, mesh: LocalMesh) -> None:
        self._channels = [grpc.insecure_channel(mesh.controlplane), grpc.insecure_channel(mesh.envoy),
                          *(grpc.insecure_channel(r) for r in mesh.routers)]
        self.cp = controlplane_pb2_grpc.ControlPlaneServiceStub(self._channels[0])
        self.traffic = traffic_pb2_grpc.TrafficServiceStub(self._channels[0])
        self.edge = inference_pb2_grpc.InferenceServiceStub(self._channels[1])
        self.kserve = kserve_grpc.GRPCInferenceServiceStub(self._channels[1])
        self.routers = [inference_pb2_grpc.InferenceServiceStub(c) for c in self._channels[2:]]

    def close(self) -> None:
        for c in self._channels:
            c.close()

    def deploy(self, name: str, replicas: int = 1, **options: str) -> None:
        spec = cp.ModelSpec(name=name, backend="sim", replicas=replicas, options=options)
        self.cp.DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)
        wait_for(lambda: all(any(m.name == name and m.ready_replicas >= replicas
                                 for m in r.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models)
                             for r in self.routers), 30, f"{name} READY on every router")

    def set(self, policy: tp.TrafficPolicy) -> tp.TrafficPolicy:
        return self.traffic.SetTrafficPolicy(tp.SetTrafficPolicyRequest(policy=policy), timeout=10).policy

    def ask(self, model: str, **fields) -> inference_pb2.GenerateResponse:
        metadata = fields.pop("metadata", None)
        return self.edge.Generate(ask("one two three", 2, model=model, **fields), timeout=10, metadata=metadata)

    def routed(self, model: str, route: str) -> bool:
        """Both routers apply the policies that lead `model` along `route` (their watches lag)."""
        return all(r.Generate(ask("x", 1, model=model), timeout=10).served_by.route == route for r in self.routers)

    def status(self, name: str) -> tp.TrafficPolicyStatus:
        return self.traffic.ListTrafficPolicies(tp.ListTrafficPoliciesRequest(name=name), timeout=10).policies[0]


@pytest.fixture(scope="module")
def clients(mesh: LocalMesh) -> Iterator[Clients]:
    c = Clients(mesh)
    yield c
    c.close()


def split(name: str, weights: dict[str, int]) -> tp.TrafficPolicy:
    return tp.TrafficPolicy(name=name, split=tp.SplitPolicy(targets=[
        tp.WeightedTarget(target=t, weight=w) for t, w in weights.items()]))


def refused(call, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    for w in words:
        assert w in info.value.details()


def test_versions_alias_split_sessions_and_refusals(clients: Clients):
    clients.deploy("ver@v1", 2)
    answer = clients.ask("ver")
    assert (answer.served_by.deployment, answer.served_by.route) == ("ver@v1", "ver[alias]>ver@v1")
    assert clients.ask("ver@v1").served_by.route == ""
    refused(lambda: clients.set(split("ver", {"ver@v1": 90, "ver@v2": 10})), grpc.StatusCode.FAILED_PRECONDITION,
            "'ver@v2' names no deployment")
    refused(lambda: clients.set(split("ver", {"ver@v1": 90, "ver@v2": 5})), grpc.StatusCode.INVALID_ARGUMENT,
            "add up to 95")
    clients.deploy("ver@v2", 1)
    clients.set(split("ver", {"ver@v1": 50, "ver@v2": 50}))
    wait_for(lambda: clients.routed("ver", "ver[split]>ver@v1") or clients.routed("ver", "ver[split]>ver@v2"),
             15, "routers to apply the split")
    seen = Counter(clients.ask("ver").served_by.deployment for _ in range(60))
    assert set(seen) == {"ver@v1", "ver@v2"}
    sticky = {clients.ask("ver", session_id="user-7").served_by.deployment for _ in range(10)}
    assert len(sticky) == 1
    refused(lambda: clients.cp.DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(name="ver", replicas=1)),
                                           timeout=10), grpc.StatusCode.FAILED_PRECONDITION, "traffic policy")
    refused(lambda: clients.cp.UndeployModel(cp.UndeployModelRequest(name="ver@v2"), timeout=10),
            grpc.StatusCode.FAILED_PRECONDITION, "traffic policy ver")
    clients.set(split("loop-a", {"ver": 100}))
    clients.set(split("loop-b", {"loop-a": 100}))
    refused(lambda: clients.set(split("loop-a", {"loop-b": 100})), grpc.StatusCode.FAILED_PRECONDITION,
            "cycle: loop-a -> loop-b -> loop-a")


async def test_a_record_written_around_the_control_plane_is_ignored(mesh: LocalMesh, clients: Clients):
    clients.deploy("hand@v1", 1)
    bad = split("handmade", {"hand@v1": 10})  # weights that do not add up
    etcd = EtcdClient(mesh.etcd_endpoints)
    try:
        await etcd.put(keyspace.traffic_policy_key("handmade"), keyspace.encode(bad))
        status = await asyncio.to_thread(wait_for, lambda: clients.status("handmade").problem, 10, "a problem")
        assert "routers ignore this record" in status and "add up to 10" in status
        for router in clients.routers:
            refused(lambda r=router: r.Generate(ask("x", 1, model="handmade"), timeout=10),
                    grpc.StatusCode.NOT_FOUND, "not served")
        listing = meshctl("--controlplane", mesh.controlplane, "traffic", "list")
        assert "handmade" in listing.stdout and "!! routers ignore" in listing.stdout
    finally:
        await etcd.delete(keyspace.traffic_policy_key("handmade"))
        await etcd.close()
    logs = [(mesh.sup.log_dir / f"router{i}.log").read_text() for i in range(2)]
    assert all("ignoring traffic policy 'handmade'" in text for text in logs)


def test_canary_rolls_back_on_injected_errors_and_a_healthy_one_is_promoted(mesh: LocalMesh, clients: Clients):
    clients.deploy("can@v1", 2)
    clients.deploy("can@v2", 1, error_rate="0.6")
    clients.deploy("good@v1", 1)
    clients.deploy("good@v2", 1)
    # TTFT p95 of a few sim requests on a loaded machine is noise: judge these on errors.
    for name, steps in (("can", [50, 100]), ("good", [30, 60])):
        clients.set(tp.TrafficPolicy(name=name, canary=tp.CanaryPolicy(
            stable=f"{name}@v1", canary=f"{name}@v2", steps=steps, step_seconds=3, min_requests=5,
            window_seconds=10, max_ttft_p95_increase=50.0)))
    deadline = time.monotonic() + 90
    steps_seen = set()
    while time.monotonic() < deadline:
        for name in ("can", "good"):
            with contextlib.suppress(grpc.RpcError):  # the canary's injected errors, before the rollback
                clients.ask(name)
        can, good = clients.status("can"), clients.status("good")
        steps_seen.add((good.canary.phase, good.canary.step))
        if can.canary.phase == tp.CANARY_PHASE_ROLLED_BACK and good.canary.phase == tp.CANARY_PHASE_PROMOTED:
            break
    assert can.canary.phase == tp.CANARY_PHASE_ROLLED_BACK and can.canary_weight == 0, can
    assert "canary error rate" in can.canary.reason
    assert good.canary.phase == tp.CANARY_PHASE_PROMOTED and good.canary_weight == 100, good
    assert (tp.CANARY_PHASE_PROGRESSING, 1) in steps_seen  # step 2 (60%) came before the promotion
    wait_for(lambda: clients.routed("can", "can[stable]>can@v1"), 10, "routers to apply the rollback")
    assert {clients.ask("can").served_by.deployment for _ in range(20)} == {"can@v1"}
    out = meshctl("--controlplane", mesh.controlplane, "status").stdout
    assert "ROLLED_BACK" in out and "PROMOTED" in out
    restarted = meshctl("--controlplane", mesh.controlplane, "traffic", "restart", "good", "--reason", "again")
    assert "restarted by an operator at step 1 (30%): again" in restarted.stdout, restarted.stderr


def test_fallback_chain_on_errors_and_first_token_timeout(clients: Clients):
    clients.deploy("fb@gpu", 1, error_rate="1")
    clients.deploy("fb@cpu", 1)
    clients.deploy("hung@a", 1, first_token_latency_s="20")
    clients.set(tp.TrafficPolicy(name="fb", fallback=tp.FallbackPolicy(links=["fb@gpu", "fb@cpu"])))
    clients.set(tp.TrafficPolicy(name="fbt", fallback=tp.FallbackPolicy(links=["hung@a", "fb@cpu"],
                                                                        first_token_timeout_ms=300)))
    wait_for(lambda: clients.routed("fb", "fb[fallback:1]>fb@cpu") and clients.routed("fbt", "fbt[fallback:1]>fb@cpu"),
             15, "routers to apply the chains")
    routes = Counter(clients.ask("fb").served_by.route for _ in range(20))
    assert routes == {"fb[fallback:1]>fb@cpu": 20}
    answer = clients.ask("fbt")
    assert answer.served_by.route == "fbt[fallback:1]>fb@cpu" and answer.text == "one two"


def test_rules_ensembles_and_kserve_through_envoy(mesh: LocalMesh, clients: Clients, tmp_path):
    for v in ("a", "b", "c"):
        clients.deploy(f"ens@{v}", 1)
    clients.deploy("plain@v1", 1)
    clients.set(tp.TrafficPolicy(name="vote", ensemble=tp.EnsemblePolicy(
        combiner=tp.ENSEMBLE_COMBINER_MAJORITY, quorum=2, members=[
            tp.EnsembleMember(target="ens@a", prompt_template="other {prompt}"),
            tp.EnsembleMember(target="ens@b"), tp.EnsembleMember(target="ens@c")])))
    rules = {"name": "chat", "rules": {"default_target": "plain", "rules": [
        {"name": "acme", "headers": [{"name": "x-tenant", "values": ["acme"]}], "target": "vote"},
        {"name": "urgent", "prompt_regex": "(?i)URGENT", "target": "ens@c"}]}}
    (tmp_path / "rules.json").write_text(json.dumps(rules))
    applied = meshctl("--controlplane", mesh.controlplane, "traffic", "apply", "-f", str(tmp_path / "rules.json"))
    assert applied.returncode == 0 and "traffic policy chat (rules) written" in applied.stdout, applied.stderr
    wait_for(lambda: clients.routed("chat", "chat[rule:default]>plain[alias]>plain@v1"), 15, "routers to apply rules")
    voted = clients.ask("chat", metadata=[("x-tenant", "acme")])
    assert voted.text == "one two" and voted.usage.completion_tokens == 6
    assert voted.served_by.route == "chat[rule:acme]>vote[ensemble:1]>ens@b"
    urgent = clients.edge.Generate(ask("this is urgent", 1, model="chat"), timeout=10)
    assert urgent.served_by.route == "chat[rule:urgent]>ens@c"
    infer = kserve_pb2.ModelInferRequest(model_name="chat")
    text = infer.inputs.add(name="text_input", datatype="BYTES", shape=[1])
    text.contents.bytes_contents.append(b"hello world")
    limit = infer.inputs.add(name="max_tokens", datatype="INT32", shape=[1])
    limit.contents.int_contents.append(2)
    resp = clients.kserve.ModelInfer(infer, timeout=10, metadata=[("x-tenant", "acme")])
    assert resp.parameters["meshserve_route"].string_param.startswith("chat[rule:acme]>vote[ensemble:")
