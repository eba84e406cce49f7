"""The cpu-dev overlay's pods run on loopback with the exact commands, args and environment of the
rendered manifests (tests/k8s_pods.py says what is translated: addresses, volumes, binaries), each
judged ready by its own readiness probe; then an operator deploys a model through the control
plane and a request goes through the edge. A flag renamed in the CLI but not in the manifests,
a probe on the wrong port or service, or an address naming nothing fails here."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.localmesh.processes import Supervisor
from tests.helpers import ask, meshctl, metrics_text, post_json, wait_for
from tests.k8s_pods import Loopback, render

pytestmark = pytest.mark.e2e

#: Pods started per workload, in this order (etcd needs its three members for quorum).
PODS = [("meshserve-etcd", 3), ("meshserve-controlplane", 1), ("meshserve-modelserver", 1),
        ("meshserve-router", 1), ("meshserve-envoy", 1), ("meshserve-openai-gateway", 1)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Loopback]:
    root = tmp_path_factory.mktemp("k8s")
    loopback = Loopback(render("cpu-dev"), root / "pods")
    sup = Supervisor(root / "logs")
    # Envoy and the gateway name each other: every pod exists before any command line is built.
    started = {workload: loopback.add_pods(workload, count) for workload, count in PODS}
    try:
        for pods in started.values():
            children = [sup.start(pod.name, loopback.argv(pod), loopback.env(pod)) for pod in pods]
            for pod, child in zip(pods, children, strict=True):
                sup.wait_ready(child, loopback.ready_check(pod), 90, "ready (its readiness probe)")
        yield loopback
    finally:
        sup.stop()


def test_manifest_commands_serve_a_request_end_to_end(cluster):
    controlplane = cluster.address(cluster.pods["meshserve-controlplane-0"], "grpc")
    out = meshctl("--controlplane", controlplane, "model", "deploy", "echo", "--backend", "sim",
                  "--option", "tokens_per_second=1000")
    assert out.returncode == 0, out.stderr
    edge = cluster.address(cluster.pods["meshserve-envoy-0"], "http")
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(edge))

    def ready() -> bool:
        models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
        return any(m.name == "echo" and m.ready_replicas == 1 for m in models)

    wait_for(ready, 60, "the model READY behind the edge")
    reply = stub.Generate(ask("kube on loopback", 3, model="echo"), timeout=30)
    assert reply.text == "kube on loopback"
    assert reply.served_by.server_id == "meshserve-modelserver-0"  # the pod name is the server id
    assert reply.served_by.router_id == "meshserve-router-0"
    assert reply.served_by.zone == "dev"
    with post_json(edge, "/v1/generate", {"model": "echo", "prompt": "json too",
                                          "sampling": {"max_tokens": 2}}) as resp:
        assert json.loads(resp.read())["text"] == "json too"
    body = {"model": "echo", "messages": [{"role": "user", "content": "openai via the gateway"}], "max_tokens": 3}
    with post_json(edge, "/v1/chat/completions", body) as resp:
        answer = json.loads(resp.read())
    assert answer["usage"]["completion_tokens"] == 3 and answer["choices"][0]["message"]["content"]


def test_metrics_and_edge_stats_answer_on_the_declared_ports(cluster):
    for name in ("meshserve-controlplane-0", "meshserve-modelserver-0", "meshserve-router-0",
                 "meshserve-openai-gateway-0"):
        assert "meshserve_" in metrics_text(cluster.address(cluster.pods[name], "metrics"))
    stats = cluster.address(cluster.pods["meshserve-envoy-0"], "stats")
    with urllib.request.urlopen(f"http://{stats}/stats/prometheus", timeout=10) as resp:
        assert b"envoy_http_downstream_rq" in resp.read()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://{stats}/config_dump", timeout=10)
    assert refused.value.code == 404  # the rest of admin stays on loopback inside the pod
