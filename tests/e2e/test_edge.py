"""The Envoy edge on a real mesh: only the public API reaches routers; wrong paths and methods
are answered by Envoy (404/405, or a gRPC status); statuses routers answer on purpose never
eject a router."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from inference import grpc_service_pb2 as kserve_pb2
from inference import grpc_service_pb2_grpc as kserve_grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.conftest import running_mesh, wait_for

pytestmark = pytest.mark.e2e

MODEL = "echo"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("edge"), base_port=0, lease_ttl=3, routers=2,
                    servers=[ServerPlan("server-0", [f"{MODEL}=sim"],
                                        engine_options=["tokens_per_second=1000"])])
    with running_mesh(plan) as m:
        wait_for(lambda: _cluster_healthy_hosts(m) == 2, 30, "both routers healthy in Envoy")
        yield m


def _admin(mesh, path: str) -> str:
    with urllib.request.urlopen(f"http://{mesh.envoy_admin}{path}", timeout=5) as resp:
        return resp.read().decode()


def stat(mesh, name: str) -> int:
    for line in _admin(mesh, f"/stats?filter=^{name}$").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    raise KeyError(name)


def _cluster_healthy_hosts(mesh) -> int:
    data = json.loads(_admin(mesh, "/clusters?format=json"))
    hosts = next(c for c in data["cluster_statuses"] if c["name"] == "routers")["host_statuses"]
    return sum(1 for h in hosts if set(h["health_status"]) == {"eds_health_status"}
               and h["health_status"]["eds_health_status"] == "HEALTHY")


def http(mesh, method: str, path: str, body: bytes | None = None):
    req = urllib.request.Request(f"http://{mesh.envoy}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


WRONG = [  # method, path, status, allow
    ("GET", "/v1/generate", 405, "POST"),
    ("PUT", "/v1/generate", 405, "POST"),
    ("GET", "/v1/generate:stream", 405, "POST"),
    ("DELETE", "/v1/meshserve/models", 405, "GET"),
    ("POST", "/v1/meshserve/models", 405, "GET"),
    ("GET", "/v1/nothing", 404, None),
    ("POST", "/v2/generate", 404, None),
    ("GET", "/", 404, None),
    ("POST", "/meshserve.v1.InferenceService/Generate", 404, None),  # gRPC path, not gRPC
]


def test_wrong_paths_and_methods_are_answered_by_envoy(mesh):
    before = stat(mesh, "cluster.routers.upstream_rq_total")
    for method, path, status, allow in WRONG:
        code, headers, body = http(mesh, method, path, b"{}" if method != "GET" else None)
        assert code == status, (method, path, code, body)
        assert headers.get("content-type") == "application/json", (method, path, headers)
        assert headers.get("allow") == allow, (method, path, headers)
        error = json.loads(body)
        assert set(error) == {"code", "message"} and error["message"], error
        assert error["code"] == (5 if status == 404 else 12)
    with grpc.insecure_channel(mesh.envoy) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/acme.Billing/Charge")(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "meshserve.v1.InferenceService" in err.value.details()
    assert stat(mesh, "cluster.routers.upstream_rq_total") == before, "a router saw a request"


def test_the_public_api_is_still_routed(mesh):
    req = inference_pb2.GenerateRequest(model=MODEL, prompt="one two three")
    req.sampling.max_tokens = 3
    with grpc.insecure_channel(mesh.envoy) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        assert stub.Generate(req, timeout=30).text == "one two three"
        assert "".join(c.text for c in stub.GenerateStream(req, timeout=30)) == "one two three"
        assert [m.name for m in stub.ListModels(inference_pb2.ListModelsRequest(),
                                                timeout=30).models] == [MODEL]
        _kserve_methods(kserve_grpc.GRPCInferenceServiceStub(channel))
        refl = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=30)
        names = {s.name for s in next(refl).list_services_response.service}
        assert {"meshserve.v1.InferenceService", "inference.GRPCInferenceService"} <= names
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="meshserve.v1.InferenceService"), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    body = json.dumps({"model": MODEL, "prompt": "one two", "sampling": {"max_tokens": 2}})
    code, _, out = http(mesh, "POST", "/v1/generate", body.encode())
    assert code == 200 and json.loads(out)["text"] == "one two"
    code, _, out = http(mesh, "POST", "/v1/generate:stream", body.encode())
    assert code == 200 and "".join(json.loads(x)["text"] for x in out.splitlines()) == "one two"
    code, _, out = http(mesh, "GET", "/v1/meshserve/models")  # GET /v1/models is OpenAI's list
    assert code == 200 and json.loads(out)["models"][0]["name"] == MODEL


def _kserve_methods(stub) -> None:
    assert stub.ServerLive(kserve_pb2.ServerLiveRequest(), timeout=30).live
    assert stub.ServerReady(kserve_pb2.ServerReadyRequest(), timeout=30).ready
    assert stub.ModelReady(kserve_pb2.ModelReadyRequest(name=MODEL), timeout=30).ready
    assert stub.ServerMetadata(kserve_pb2.ServerMetadataRequest(), timeout=30).name
    assert stub.ModelMetadata(kserve_pb2.ModelMetadataRequest(name=MODEL), timeout=30).name == MODEL
    infer = kserve_pb2.ModelInferRequest(model_name=MODEL, id="edge-1")
    text = infer.inputs.add(name="text_input", datatype="BYTES", shape=[1, 1])
    text.contents.bytes_contents.append(b"one two")
    tokens = infer.inputs.add(name="max_tokens", datatype="INT32", shape=[1, 1])
    tokens.contents.int_contents.append(2)
    assert stub.ModelInfer(infer, timeout=30).model_name == MODEL
    replies = list(stub.ModelStreamInfer(iter([infer]), timeout=30))
    assert replies and not any(r.error_message for r in replies), replies


def _deploy_without_replicas(mesh, model: str) -> None:
    """A deployed model scaled to 0: routers answer UNAVAILABLE for it, on purpose."""
    with grpc.insecure_channel(mesh.controlplane) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneServiceStub(channel)
        stub.DeployModel(cp.DeployModelRequest(
            spec=cp.ModelSpec(name=model, backend="sim", replicas=1)), timeout=30)
        stub.ScaleModel(cp.ScaleModelRequest(name=model, replicas=0), timeout=30)


def test_deliberate_unavailable_answers_never_eject_a_router(mesh):
    _deploy_without_replicas(mesh, "ghost")
    req = inference_pb2.GenerateRequest(model="ghost", prompt="x")
    with grpc.insecure_channel(mesh.envoy) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def answers_unavailable() -> bool:
            try:
                stub.Generate(req, timeout=30)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.UNAVAILABLE
            return False

        wait_for(answers_unavailable, 30, "routers to answer UNAVAILABLE for a scaled-to-0 model")
        before = stat(mesh, "cluster.routers.upstream_rq_total")
        for _ in range(30):
            assert answers_unavailable()
        # Envoy retried each twice on the other router: 90 UNAVAILABLE answers, 45 per router.
        assert stat(mesh, "cluster.routers.upstream_rq_total") - before >= 90
        assert stat(mesh, "cluster.routers.outlier_detection.ejections_enforced_total") == 0
        assert stat(mesh, "cluster.routers.outlier_detection.ejections_active") == 0
        assert _cluster_healthy_hosts(mesh) == 2
        ok = inference_pb2.GenerateRequest(model=MODEL, prompt="still here")
        ok.sampling.max_tokens = 2
        routers = {stub.Generate(ok, timeout=30).served_by.router_id for _ in range(20)}
    assert routers == {"router0", "router1"}
