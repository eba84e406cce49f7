"""The engine's part of a request's trace: queue wait, prefill and decode, as children of the
model server's `modelserver.generate` span.

They are recorded when the stream ends, from times taken on the way (the engine marks when it
first scheduled the request in `GenerationRequest.timeline`; the servicer marks the first
token), so the engines stay free of tracing code and the stream pays one clock read per phase.
A backend that does not report scheduling (TensorRT-LLM) gets one `engine.prefill` span from
submission to the first token, with `meshserve.queue_wait_known` false.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from services.common import tracing

from .engine.base import Engine, FinishReason, GenerationRequest, Usage


@dataclass
class EngineTimes:
    """Wall-clock marks (time.time_ns()) of one generation, and how it ended."""

    submitted_ns: int = field(default_factory=time.time_ns)
    first_token_ns: int = 0
    usage: Usage | None = None
    finish: FinishReason | None = None

    def first_token(self) -> None:
        self.first_token_ns = time.time_ns()

    def scheduled_ns(self, req: GenerationRequest) -> int:
        """The engine's scheduling mark, if it falls inside this generation (else 0)."""
        mark = req.timeline.scheduled_ns
        return mark if mark >= self.submitted_ns else 0


def generate_span(context: grpc.aio.ServicerContext, server_id: str) -> tracing.Span:
    """`modelserver.generate`, continuing the router's traceparent; NOOP (the metadata not even
    read) when tracing is off."""
    if not tracing.enabled():
        return tracing.NOOP
    return tracing.server_span("modelserver.generate", context.invocation_metadata(),
                               attributes={"meshserve.server": server_id})


def trace_engine(span: tracing.Span, req: GenerationRequest, times: EngineTimes, produced: int,
                 engine: Engine) -> None:
    """Record the engine spans under `span` and its usage attributes; nothing when not tracing."""
    if not span.recording:
        return
    end = time.time_ns()
    usage = times.usage
    span.set("gen_ai.request.model", req.model)
    span.set("meshserve.request_id", req.request_id)
    span.set("meshserve.backend", engine.backend)
    span.set("meshserve.priority", req.priority.name)
    span.set("meshserve.resumed_tokens", len(req.resume_token_ids))
    span.set("gen_ai.request.max_tokens", req.sampling.max_tokens)
    if usage is not None:
        span.set("gen_ai.usage.input_tokens", usage.prompt_tokens)
        span.set("gen_ai.usage.output_tokens", usage.completion_tokens)
        span.set("meshserve.cached_tokens", usage.cached_tokens)
    if times.finish is not None:
        span.set("gen_ai.response.finish_reasons", times.finish.value)
    scheduled = times.scheduled_ns(req)
    prefill_from = scheduled or times.submitted_ns
    if scheduled:
        span.record("engine.queue", times.submitted_ns, scheduled)
    prefill_end = times.first_token_ns or end
    span.record("engine.prefill", prefill_from, prefill_end,
                {"meshserve.queue_wait_known": bool(scheduled),
                 "meshserve.cached_tokens": usage.cached_tokens if usage is not None else 0})
    if times.first_token_ns:
        span.record("engine.decode", times.first_token_ns, end, {"meshserve.generated_tokens": produced})

