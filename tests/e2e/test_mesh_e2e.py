"""The whole mesh on real parts: etcd, Envoy, control plane, router and two sim model servers.

Tests share one mesh and leave it as they found it (the drain test undrains), so each passes alone
and in any order; the SIGKILL test gets a mesh of its own.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, post_json, running_mesh, wait_for

pytestmark = pytest.mark.e2e

MODEL = "echo"


def plan(data_dir: Path) -> MeshPlan:
    return MeshPlan(
        data_dir=data_dir, base_port=0, lease_ttl=3,
        servers=[ServerPlan("server-0", [f"{MODEL}=sim"], zone="local-a",
                            engine_options=["tokens_per_second=1000"]),
                 ServerPlan("server-1", [f"{MODEL}=sim"], zone="local-b",
                            engine_options=["tokens_per_second=1000"])])


def both_ready(stub) -> bool:
    models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
    return [(m.name, m.ready_replicas) for m in models] == [(MODEL, 2)]


@contextmanager
def envoy_stub(mesh: LocalMesh) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(mesh.envoy) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        wait_for(lambda: both_ready(stub), 30, "both servers ready behind Envoy")
        yield stub


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[LocalMesh]:
    with running_mesh(plan(tmp_path_factory.mktemp("mesh"))) as m:
        yield m


@pytest.fixture(scope="module")
def stub(mesh: LocalMesh) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with envoy_stub(mesh) as s:
        yield s


def test_every_service_reports_grpc_health(mesh):
    targets = {"controlplane": (mesh.controlplane, "meshserve.v1.ControlPlaneService"),
               "router0": (mesh.routers[0], "meshserve.v1.InferenceService"),
               **{sid: (a, f"meshserve.v1.ModelServerService/{MODEL}")
                  for sid, a in mesh.servers.items()}}
    for name, (address, service) in targets.items():
        with grpc.insecure_channel(address) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            for svc in ("", service):
                resp = stub.Check(health_pb2.HealthCheckRequest(service=svc), timeout=5)
                assert resp.status == health_pb2.HealthCheckResponse.SERVING, (name, svc)


def test_unary_generate_through_envoy(stub):
    resp = stub.Generate(ask("alpha beta gamma", max_tokens=5), timeout=30)
    assert resp.text == "alpha beta gamma alpha beta"
    assert len(resp.token_ids) == 5
    assert resp.finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert resp.usage.prompt_tokens == 3 and resp.usage.completion_tokens == 5
    assert resp.served_by.server_id in ("server-0", "server-1")
    assert resp.served_by.router_id == "router0"
    assert resp.served_by.simulated and resp.served_by.backend == "sim"
    assert resp.request_id


def test_streaming_generate_through_envoy(stub):
    chunks = list(stub.GenerateStream(ask("one two", max_tokens=6), timeout=30))
    assert len(chunks) == 6
    assert "".join(c.text for c in chunks) == "one two one two one two"
    assert chunks[-1].finish_reason == common_pb2.FINISH_REASON_LENGTH
    assert chunks[-1].usage.completion_tokens == 6
    assert all(c.finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in chunks[:-1])


def test_json_over_http_transcoding(mesh, stub):
    with post_json(mesh.envoy, "/v1/generate", {"model": MODEL, "messages": [{"role": "user", "content": "hi there"}],
                                      "sampling": {"max_tokens": 3}}) as resp:
        body = json.loads(resp.read())
    assert body["text"] == "hi there hi"
    assert body["usage"]["completion_tokens"] == 3
    assert body["served_by"]["simulated"] is True
    with post_json(mesh.envoy, "/v1/generate:stream", {"model": MODEL, "prompt": "a b",
                                             "sampling": {"max_tokens": 3}}) as resp:
        lines = [json.loads(x) for x in resp.read().decode().splitlines() if x.strip()]
    assert [x["text"] for x in lines] == ["a", " b", " a"]
    with urllib.request.urlopen(f"http://{mesh.envoy}/v1/meshserve/models", timeout=10) as resp:
        models = json.loads(resp.read())["models"]
    assert models == [{"name": MODEL, "ready_replicas": 2, "regions": ["local"]}]


def test_json_errors_carry_grpc_status(mesh):
    with pytest.raises(urllib.error.HTTPError) as info:
        post_json(mesh.envoy, "/v1/generate", {"model": "no-such-model", "prompt": "x"})
    assert info.value.code == 404
    body = json.loads(info.value.read())
    assert body["code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert "no-such-model" in body["message"]


@pytest.mark.parametrize("mutate, code, words", [
    (lambda r: setattr(r, "model", "no-such-model"), grpc.StatusCode.NOT_FOUND, "not served"),
    (lambda r: setattr(r, "prompt", ""), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    (lambda r: setattr(r.sampling, "max_tokens", -1), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
    (lambda r: setattr(r.sampling, "temperature", -0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
    (lambda r: setattr(r.sampling, "top_p", 1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (lambda r: setattr(r.sampling, "top_p", -0.1), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
    (lambda r: setattr(r, "prompt", "x" * (600 * 1024)), grpc.StatusCode.INVALID_ARGUMENT, "limit"),
    (lambda r: r.messages.add(role="user", content="both"), grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    (lambda r: setattr(r, "priority", 42), grpc.StatusCode.INVALID_ARGUMENT, "priority"),
])
def test_bad_input_gets_precise_status(mesh, stub, mutate, code, words):
    req = ask()
    mutate(req)
    for call in (lambda: stub.Generate(req, timeout=30),
                 lambda: list(stub.GenerateStream(req, timeout=30))):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == code
        assert words in info.value.details()
    # Nothing fell over: every process is alive and a good request still succeeds.
    assert all(ch.alive() for ch in mesh.children.values())
    assert stub.Generate(ask(), timeout=30).usage.completion_tokens == 2


def test_bad_input_straight_to_a_model_server(mesh):
    from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

    with grpc.insecure_channel(mesh.servers["server-0"]) as ch:
        ms = modelserver_pb2_grpc.ModelServerServiceStub(ch)
        bad = modelserver_pb2.ModelServerServiceGenerateRequest(model=MODEL, prompt="x")
        bad.sampling.top_p = 2.0
        with pytest.raises(grpc.RpcError) as info:
            list(ms.Generate(bad, timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        missing = modelserver_pb2.ModelServerServiceGenerateRequest(model="nope", prompt="x")
        with pytest.raises(grpc.RpcError) as info:
            list(ms.Generate(missing, timeout=10))
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        good = modelserver_pb2.ModelServerServiceGenerateRequest(model=MODEL, prompt="ok go")
        good.sampling.max_tokens = 2
        assert "".join(p.text for p in ms.Generate(good, timeout=10)) == "ok go"


def test_meshctl_status_and_servers(mesh):
    out = meshctl("--controlplane", mesh.controlplane, "status")
    assert out.returncode == 0, out.stderr
    for word in ("server-0", "server-1", "router0", MODEL, "SERVING", mesh.etcd_clients[0]):
        assert word in out.stdout
    out = meshctl("--controlplane", mesh.controlplane, "-o", "json", "servers")
    assert out.returncode == 0, out.stderr
    servers = json.loads(out.stdout)["servers"]
    assert sorted(s["info"]["server_id"] for s in servers) == ["server-0", "server-1"]


def test_meshctl_generate_through_envoy(mesh):
    out = meshctl("--endpoint", mesh.envoy, "generate", MODEL, "tick tock", "--max-tokens", "3")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "tick tock tick"
    assert "SIMULATED" in out.stderr
    out = meshctl("--endpoint", mesh.envoy, "generate", MODEL, "tick tock", "--max-tokens", "3",
                  "--stream")
    assert out.returncode == 0 and out.stdout.strip() == "tick tock tick"


def test_meshctl_errors_are_clear(mesh):
    out = meshctl("--controlplane", mesh.controlplane, "drain", "no-such-server")
    assert out.returncode == 1
    assert "NOT_FOUND" in out.stderr and "no-such-server" in out.stderr
    out = meshctl("--controlplane", "127.0.0.1:1", "--timeout", "2", "status")
    assert out.returncode == 3
    assert "cannot reach 127.0.0.1:1" in out.stderr


def _served_by(stub, n: int) -> Counter[str]:
    return Counter(stub.Generate(ask(), timeout=30).served_by.server_id for _ in range(n))


def _states(mesh: LocalMesh) -> dict[str, str]:
    out = meshctl("--controlplane", mesh.controlplane, "-o", "json", "servers")
    return {s["info"]["server_id"]: s["state"] for s in json.loads(out.stdout)["servers"]}


def test_drain_moves_new_traffic_away(mesh, stub):
    out = meshctl("--controlplane", mesh.controlplane, "drain", "server-0", "--reason", "test")
    assert out.returncode == 0, out.stderr
    try:
        # Routers learn the drain through their etcd watch; then no new request goes there.
        wait_for(lambda: _served_by(stub, 4) == Counter({"server-1": 4}), 15, "traffic to leave server-0")
        assert _served_by(stub, 20) == Counter({"server-1": 20})
        assert _states(mesh) == {"server-0": "SERVING_STATE_DRAINING", "server-1": "SERVING_STATE_SERVING"}
    finally:
        out = meshctl("--controlplane", mesh.controlplane, "undrain", "server-0")
        assert out.returncode == 0, out.stderr
    wait_for(lambda: "server-0" in _served_by(stub, 8), 15, "server-0 to take traffic again")
    wait_for(lambda: set(_states(mesh).values()) == {"SERVING_STATE_SERVING"}, 15, "both SERVING")


@pytest.fixture
def own_mesh(tmp_path: Path) -> Iterator[LocalMesh]:
    """A mesh of the same shape for the test that kills one of its servers."""
    with running_mesh(plan(tmp_path)) as m:
        yield m


def test_sigkilled_server_traffic_keeps_succeeding_and_it_leaves_membership(own_mesh):
    mesh = own_mesh
    with envoy_stub(mesh) as stub:
        mesh.sup.kill(mesh.children["server-1"])
        # Right after the kill its lease is still alive: the router must retry elsewhere, not fail.
        served: Counter[str] = Counter()
        for _ in range(30):
            served[stub.Generate(ask(), timeout=30).served_by.server_id] += 1
            chunks = list(stub.GenerateStream(ask(), timeout=30))
            assert chunks[-1].usage.completion_tokens == 2
        assert served == Counter({"server-0": 30})
        wait_for(lambda: list(_states(mesh)) == ["server-0"], 20,
                 "server-1's lease to expire and it to leave membership", interval=0.5)
        models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=10).models
        assert [(m.name, m.ready_replicas) for m in models] == [(MODEL, 1)]
