"""An OTLP/gRPC trace collector inside the test process: the mesh's processes (and Envoy) export
their spans to it, and tests read them back as plain records."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2

from services.localmesh.components import free_port


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str  # '' for a root
    name: str
    service: str
    attributes: dict[str, object] = field(default_factory=dict, compare=False, hash=False)


def _value(v: common_pb2.AnyValue) -> object:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind else None


class OtlpSink(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._spans: list[SpanRecord] = []
        self.address = ""

    def Export(self, request, context):
        out: list[SpanRecord] = []
        for rs in request.resource_spans:
            resource = {a.key: _value(a.value) for a in rs.resource.attributes}
            out.extend(SpanRecord(
                trace_id=s.trace_id.hex(), span_id=s.span_id.hex(), parent_id=s.parent_span_id.hex(),
                name=s.name, service=str(resource.get("service.name", "")),
                attributes={a.key: _value(a.value) for a in s.attributes})
                for scope in rs.scope_spans for s in scope.spans)
        with self._lock:
            self._spans.extend(out)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[SpanRecord]:
        with self._lock:
            return list(self._spans)

    def trace(self, trace_id: str) -> list[SpanRecord]:
        return [s for s in self.spans() if s.trace_id == trace_id]


@contextmanager
def otlp_sink() -> Iterator[OtlpSink]:
    """A running collector on a free loopback port (`sink.address`), stopped afterwards."""
    sink = OtlpSink()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(sink, server)
    port = free_port()
    server.add_insecure_port(f"127.0.0.1:{port}")
    sink.address = f"127.0.0.1:{port}"
    server.start()
    try:
        yield sink
    finally:
        server.stop(grace=None)
