"""Tracing across the mesh: every process (Envoy included) exports OTLP to a collector in this
test process; each request is one connected trace from the client's traceparent (or from Envoy,
for a client that sends none) through router and model server down to the engine's phases, and
no span carries prompt text."""

from __future__ import annotations

import functools
import json
import os
import secrets
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from meshserve.v1 import inference_pb2_grpc

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import ask, running_mesh, wait_for
from tests.otlp_sink import OtlpSink, SpanRecord, otlp_sink

pytestmark = pytest.mark.e2e

MODEL = "echo"
PROMPT = "zebra violet quartz"  # words no span may carry
SERVICES = {"meshserve-envoy", "meshserve-router", "meshserve-modelserver"}
#: (span, the span its parent must be) for every span a request produces on its way.
PARENTS = {
    "router.request": None,  # Envoy's span
    "router.route": "router.request",
    "router.attempt": "router.request",
    "modelserver.generate": "router.attempt",
    "engine.queue": "modelserver.generate",
    "engine.prefill": "modelserver.generate",
    "engine.decode": "modelserver.generate",
}


@pytest.fixture(scope="module")
def traced(tmp_path_factory) -> Iterator[tuple[object, OtlpSink]]:
    saved = os.environ.get("OTEL_BSP_SCHEDULE_DELAY")
    os.environ["OTEL_BSP_SCHEDULE_DELAY"] = "100"  # children inherit it: export within 0.1 s
    try:
        with otlp_sink() as sink:
            plan = MeshPlan(data_dir=tmp_path_factory.mktemp("tracing"), base_port=0, lease_ttl=3,
                            otlp_endpoint=sink.address,
                            servers=[ServerPlan("server-0", [f"{MODEL}=sim"],
                                                engine_options=["tokens_per_second=1000"])])
            with running_mesh(plan) as mesh:
                yield mesh, sink
    finally:
        if saved is None:
            os.environ.pop("OTEL_BSP_SCHEDULE_DELAY", None)
        else:
            os.environ["OTEL_BSP_SCHEDULE_DELAY"] = saved


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def _complete(sink: OtlpSink, trace_id: str) -> list[SpanRecord] | None:
    spans = sink.trace(trace_id)
    names = {s.name for s in spans}
    services = {s.service for s in spans}
    return spans if set(PARENTS) <= names and services >= SERVICES else None


def _check_connected(spans: list[SpanRecord], client_span: str) -> None:
    """One trace, one root (the first span in the mesh, a child of the client's span, if any),
    every other span a child of a span in the trace, and each hop under the one before it."""
    ids = {s.span_id: s for s in spans}
    roots = [s for s in spans if s.parent_id not in ids]
    assert len(roots) == 1, f"more than one root: {[(s.service, s.name, s.parent_id) for s in roots]}"
    assert roots[0].service == "meshserve-envoy" and roots[0].parent_id == client_span
    for s in spans:
        if s.name not in PARENTS:
            continue
        parent = ids[s.parent_id]
        expected = PARENTS[s.name]
        if expected is None:
            assert parent.service == "meshserve-envoy", s
        else:
            assert parent.name == expected, f"{s.name} under {parent.name}, expected {expected}"
    for s in spans:
        for value in s.attributes.values():
            assert not any(w in str(value) for w in PROMPT.split()), f"prompt text in {s.name}: {value}"


def test_grpc_requests_are_one_connected_trace_each(traced):
    mesh, sink = traced
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(mesh.envoy))
    sent = []
    for i, streaming in enumerate((True, False, True)):
        trace_id, span_id, header = _traceparent()
        req = ask(PROMPT, 4, model=MODEL, request_id=f"traced-{i}")
        if streaming:
            chunks = list(stub.GenerateStream(req, metadata=[("traceparent", header)], timeout=30))
            assert sum(len(c.token_ids) for c in chunks) == 4
        else:
            assert stub.Generate(req, metadata=[("traceparent", header)], timeout=30).usage.completion_tokens == 4
        sent.append((trace_id, span_id, f"traced-{i}"))
    for trace_id, span_id, request_id in sent:
        spans = wait_for(functools.partial(_complete, sink, trace_id), 30, f"every span of trace {trace_id}")
        _check_connected(spans, span_id)
        generate = next(s for s in spans if s.name == "modelserver.generate")
        assert generate.attributes["meshserve.request_id"] == request_id
        assert generate.attributes["gen_ai.usage.output_tokens"] == 4
        assert generate.attributes["meshserve.server"] == "server-0"
        attempt = next(s for s in spans if s.name == "router.attempt")
        assert attempt.attributes["meshserve.server"] == "server-0"
        assert [s.name for s in spans].count("router.request") == 1


def test_a_client_without_traceparent_gets_a_trace_started_at_envoy(traced):
    mesh, sink = traced
    body = {"model": MODEL, "prompt": PROMPT, "request_id": "json-untraced", "sampling": {"max_tokens": 3}}
    req = urllib.request.Request(f"http://{mesh.envoy}/v1/generate", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read())["usage"]["completion_tokens"] == 3

    def trace_of_request() -> list[SpanRecord] | None:
        ids = {s.trace_id for s in sink.spans() if s.attributes.get("meshserve.request_id") == "json-untraced"}
        return _complete(sink, ids.pop()) if len(ids) == 1 else None

    spans = wait_for(trace_of_request, 30, "the JSON request's trace")
    _check_connected(spans, "")
