"""services/common/tracing.py: off it costs nothing (opentelemetry is not even imported); on, a
server span continues the caller's traceparent and hands its own to outgoing calls."""

from __future__ import annotations

import subprocess
import sys

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from services.common import tracing

OFF_CHECK = """
import sys
from services.cli.meshserve import build_parser
from services.common import tracing
from services.modelserver import servicer, spans as ms_spans
from services.router import dispatch, spans
args = build_parser().parse_args(["router"])
assert args.otlp_traces_endpoint == "", "tracing must be off by default"
assert tracing.configure("x", "y", args.otlp_traces_endpoint) is False
span = tracing.server_span("r", [("traceparent", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")])
assert span is tracing.NOOP and span.child("c") is tracing.NOOP and span.headers() == []
loaded = sorted(m for m in sys.modules if m.startswith("opentelemetry"))
assert not loaded, loaded
"""


def test_off_by_default_and_opentelemetry_is_never_imported():
    done = subprocess.run([sys.executable, "-c", OFF_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def exporter():
    exp = InMemorySpanExporter()
    assert tracing.configure("meshserve-test", "t-1", "", exporter=exp)
    try:
        yield exp
    finally:
        tracing.shutdown()
    assert not tracing.enabled()


def test_server_span_continues_the_callers_trace_and_propagates_its_own(exporter):
    trace_id, caller = "ab" * 16, "cd" * 8
    metadata: list[tuple[str, str | bytes]] = [("TraceParent", f"00-{trace_id}-{caller}-01"),
                                               ("x-bin", b"\x00\x01")]
    root = tracing.server_span("router.request", metadata, attributes={"gen_ai.request.model": "m"})
    attempt = root.child("router.attempt", client=True)
    (key, value), = attempt.headers()
    assert key == "traceparent" and value.split("-")[1] == trace_id
    downstream = tracing.server_span("modelserver.generate", dict(attempt.headers()))
    downstream.record("engine.prefill", 1_000, 2_000)
    downstream.fail("UNAVAILABLE")
    for span in (downstream, attempt, root):
        span.end()
    tracing.shutdown()  # flushes the batch processor
    got = {s.name: s for s in exporter.get_finished_spans()}
    assert {s.context.trace_id for s in got.values()} == {int(trace_id, 16)}
    assert got["router.request"].parent.span_id == int(caller, 16)
    assert got["router.attempt"].parent.span_id == got["router.request"].context.span_id
    assert got["modelserver.generate"].parent.span_id == got["router.attempt"].context.span_id
    assert got["engine.prefill"].parent.span_id == got["modelserver.generate"].context.span_id
    assert (got["engine.prefill"].start_time, got["engine.prefill"].end_time) == (1_000, 2_000)
    assert not got["modelserver.generate"].status.is_ok
    assert got["router.request"].resource.attributes["service.name"] == "meshserve-test"


def test_no_traceparent_starts_a_new_trace(exporter):
    tracing.server_span("router.request", None).end()
    tracing.shutdown()
    (span,) = exporter.get_finished_spans()
    assert span.parent is None and span.context.trace_id != 0
