"""What tracing costs per request: every tracing hook the router and the model server run for one
request (one attempt), timed in-process, with tracing off (the default) and on (spans built and
handed to a batch exporter that drops them). `python -m bench.router.tracing_cost`

The end-to-end overhead bench (`make bench-router`) cannot resolve microseconds on a shared
2-core machine; this isolates the hooks themselves. Compare with the router's CPU per request
in bench/results/router.md (about 1-2 ms)."""

from __future__ import annotations

import time
import timeit
from collections.abc import Sequence
from types import SimpleNamespace

from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from services.common import tracing
from services.common.validation import validate_request
from services.modelserver.engine.base import FinishReason, GenerationRequest, Usage
from services.modelserver.engine.sim import SimEngine
from services.modelserver.spans import EngineTimes, trace_engine
from services.router import spans
from services.router.attempt import Outcome
from tests.helpers import ask

N = 20_000


class _Drop(SpanExporter):
    def export(self, spans: Sequence[object]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


_DONE = Outcome(tokens=2, done=True)  # these exist per request with or without tracing
_USAGE = Usage(2, 2)
_ENGINE = SimEngine("echo")  # not started: only its backend name is read


def one_request(req, replica, metadata, gen: GenerationRequest) -> None:
    """The hooks of dispatch.py, attempt.py and the model server's servicer, in their order."""
    span = spans.request_span(req, metadata, "router0")
    span.set("meshserve.request_id", "r-1")
    spans.queued(span, 0.0)
    started = time.time_ns() if span.recording else 0
    spans.routed(span, started, replica, "load", 2)
    attempt = spans.attempt_span(span, replica, 1, 0)
    upstream = tuple(attempt.headers()) or None
    spans.end_attempt(attempt, _DONE)
    server = tracing.server_span("modelserver.generate", upstream, attributes={"meshserve.server": "s0"})
    times = EngineTimes()
    gen.timeline.scheduled()
    times.first_token()
    times.usage, times.finish = _USAGE, FinishReason.LENGTH
    trace_engine(server, gen, times, 2, _ENGINE)
    server.end()
    span.end()


def measure() -> dict[str, float]:
    req = validate_request(ask("ping pong", 2))
    gen = GenerationRequest.from_valid(req, None)
    replica = SimpleNamespace(server_id="server-0")
    metadata = [("traceparent", "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01")]
    out = {"empty_call_ns": min(timeit.repeat(lambda: None, number=N, repeat=3)) / N * 1e9}
    off = min(timeit.repeat(lambda: one_request(req, replica, metadata, gen), number=N, repeat=3)) / N
    out["off_us"] = off * 1e6
    tracing.configure("bench", "b", "", exporter=_Drop())
    try:
        on = min(timeit.repeat(lambda: one_request(req, replica, metadata, gen), number=N // 10, repeat=3))
        out["on_us"] = on / (N // 10) * 1e6
    finally:
        tracing.shutdown()
    return out


if __name__ == "__main__":
    result = measure()
    print(f"tracing hooks per request: off {result['off_us']:.2f} us, on {result['on_us']:.1f} us "
          f"(an empty Python call here: {result['empty_call_ns']:.0f} ns)")
