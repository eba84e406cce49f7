"""Distributed tracing for every MeshServe process: OpenTelemetry spans, W3C trace context.

Off by default, and then free: until `configure` runs with an OTLP endpoint, every hook returns
`NOOP`, whose methods do nothing, and opentelemetry is never imported (a process that does not
trace does not even load it). On, spans go to an OTLP/gRPC collector through a batching
exporter thread, so the request path only builds span objects.

Spans are passed explicitly (`parent.child(...)`), never through the "current span" context
variable: the request paths are async generators, where a context attached in one step leaks
into whatever the consumer runs between steps. The one entry point for a process that receives
a request is `server_span(name, carrier)`, which continues the caller's `traceparent` (gRPC
metadata or HTTP headers) or starts a trace; `span.headers()` gives the metadata to send on an
outgoing call. Attributes carry ids, sizes and outcomes, never prompt or output text.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any

log = logging.getLogger(__name__)

#: Attribute values a span may carry.
AttrValue = str | int | float | bool
Carrier = Mapping[str, str] | Iterable[tuple[str, str | bytes]] | None


class Span:
    """A span, or NOOP when tracing is off. `end` may be called once; later calls do nothing."""

    recording = False

    def child(self, name: str, *, client: bool = False, start_ns: int | None = None,
              attributes: Mapping[str, AttrValue] | None = None) -> Span:
        """A span under this one (`client`: it covers an outgoing call)."""
        return self

    def record(self, name: str, start_ns: int, end_ns: int | None = None,
               attributes: Mapping[str, AttrValue] | None = None) -> None:
        """A finished child span from `start_ns` to `end_ns` (default now), times from time.time_ns()."""

    def set(self, key: str, value: AttrValue) -> None:
        """Set one attribute."""

    def fail(self, code: str, message: str = "") -> None:
        """Mark the span failed with a gRPC status name (and its message, which names no prompt)."""

    def end(self, end_ns: int | None = None) -> None:
        """Finish the span (at `end_ns`, default now)."""

    def headers(self) -> list[tuple[str, str]]:
        """`traceparent` (and `tracestate`) naming this span, for an outgoing gRPC or HTTP call."""
        return []


NOOP = Span()

_tracer: Any = None  # opentelemetry.trace.Tracer once configured
_provider: Any = None
_propagator: Any = None


def enabled() -> bool:
    return _tracer is not None


def configure(service: str, instance: str, endpoint: str, exporter: Any = None) -> bool:
    """Start exporting this process's spans to the OTLP/gRPC `endpoint` (`http://host:4317`,
    `https://...` for TLS; a bare host:port is plaintext). An empty endpoint and no `exporter`
    leaves tracing off. `exporter` (a SpanExporter) replaces OTLP, for tests. Sampling follows
    the standard OTEL_TRACES_SAMPLER variables (default: parent-based, always on)."""
    global _tracer, _provider, _propagator
    if not endpoint and exporter is None:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint, insecure=not endpoint.startswith("https://"))
    resource = Resource.create({"service.name": service, "service.instance.id": instance})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    _provider, _propagator = provider, TraceContextTextMapPropagator()
    _tracer = provider.get_tracer("meshserve")
    log.info("tracing on: spans of %s go to %s", service, endpoint or type(exporter).__name__)
    return True


def shutdown() -> None:
    """Flush what is buffered and stop exporting (a process calls it on its way out)."""
    global _tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    _tracer = _provider = None


def server_span(name: str, carrier: Carrier, *, start_ns: int | None = None,
                attributes: Mapping[str, AttrValue] | None = None) -> Span:
    """The span of a request this process received: a child of the caller's `traceparent` in
    `carrier` (gRPC invocation metadata or HTTP headers), or the root of a new trace."""
    if _tracer is None:
        return NOOP
    from opentelemetry.trace import SpanKind

    context = _propagator.extract(_text_carrier(carrier))
    return _OtelSpan(_tracer.start_span(name, context=context, kind=SpanKind.SERVER,
                                        start_time=start_ns, attributes=attributes))


def _text_carrier(carrier: Carrier) -> dict[str, str]:
    pairs = carrier.items() if isinstance(carrier, Mapping) else (carrier or ())
    out = {}
    for key, value in pairs:
        if isinstance(value, bytes):  # binary metadata (-bin keys) carries no trace context
            continue
        out[key.lower()] = value
    return out


class _OtelSpan(Span):
    recording = True

    def __init__(self, span: Any) -> None:
        self._span = span

    def child(self, name: str, *, client: bool = False, start_ns: int | None = None,
              attributes: Mapping[str, AttrValue] | None = None) -> Span:
        from opentelemetry.trace import SpanKind, set_span_in_context

        kind = SpanKind.CLIENT if client else SpanKind.INTERNAL
        return _OtelSpan(_tracer.start_span(name, context=set_span_in_context(self._span), kind=kind,
                                            start_time=start_ns, attributes=attributes))

    def record(self, name: str, start_ns: int, end_ns: int | None = None,
               attributes: Mapping[str, AttrValue] | None = None) -> None:
        self.child(name, start_ns=start_ns, attributes=attributes).end(end_ns or time.time_ns())

    def set(self, key: str, value: AttrValue) -> None:
        self._span.set_attribute(key, value)

    def fail(self, code: str, message: str = "") -> None:
        from opentelemetry.trace import Status, StatusCode

        self._span.set_attribute("rpc.grpc.status_code", code)
        self._span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"[:512]))

    def end(self, end_ns: int | None = None) -> None:
        self._span.end(end_time=end_ns)

    def headers(self) -> list[tuple[str, str]]:
        from opentelemetry.trace import set_span_in_context

        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=set_span_in_context(self._span))
        return list(carrier.items())
