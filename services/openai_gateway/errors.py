"""OpenAI's error shape and the HTTP status for every way a request can fail.

The gateway raises and receives the mesh's own errors (`services/common/errors.py`): its request
parsing raises `InvalidArgument` (or `BadField`, which names the offending field as OpenAI's
`param`), and an upstream gRPC status becomes the matching `ServiceError`. This module is the one
place that turns any of them into `{"error": {"message", "type", "param", "code"}}` with the HTTP
status an OpenAI client expects, so a 404 for an unknown model or a 429 with retry-after looks
the same whether it came from the gateway, a router or Envoy's rate limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import grpc

from services.common.errors import RETRY_AFTER_TRAILER, InvalidArgument, ServiceError


class BadField(InvalidArgument):
    """An invalid request field; `param` names it the way OpenAI's errors do (e.g. "messages[0].role")."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class _Kind:
    status: int
    type: str
    code: str | None = None


# gRPC status -> (HTTP status, OpenAI error type, code). The types are the ones OpenAI's API and
# SDKs use; statuses follow the usual gRPC/HTTP correspondence, so retrying clients (the openai SDK
# retries 408, 409, 429 and 5xx) retry exactly what the mesh says is retryable.
_KINDS: dict[grpc.StatusCode, _Kind] = {
    grpc.StatusCode.INVALID_ARGUMENT: _Kind(400, "invalid_request_error"),
    grpc.StatusCode.OUT_OF_RANGE: _Kind(400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: _Kind(400, "invalid_request_error", "failed_precondition"),
    grpc.StatusCode.UNAUTHENTICATED: _Kind(401, "authentication_error", "invalid_api_key"),
    grpc.StatusCode.PERMISSION_DENIED: _Kind(403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: _Kind(404, "invalid_request_error", "model_not_found"),
    grpc.StatusCode.ALREADY_EXISTS: _Kind(409, "invalid_request_error", "conflict"),
    grpc.StatusCode.ABORTED: _Kind(409, "server_error", "aborted"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: _Kind(429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.CANCELLED: _Kind(499, "server_error", "cancelled"),
    grpc.StatusCode.UNIMPLEMENTED: _Kind(501, "server_error", "not_implemented"),
    grpc.StatusCode.UNAVAILABLE: _Kind(503, "server_error", "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: _Kind(504, "server_error", "timeout"),
}
_INTERNAL = _Kind(500, "server_error", "internal_error")

#: Header (a trailer, for gRPC) Envoy's local rate limit adds to what it refuses.
EDGE_RATE_LIMITED = "x-meshserve-rate-limited"
#: Retry hint when a 429 or 503 carries none of its own (seconds).
DEFAULT_RETRY_AFTER_S = 1


@dataclass
class HttpError:
    """One error answer: HTTP status, OpenAI body and headers (retry-after on 429/503)."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)


def _retry_after_ms(err: ServiceError) -> int | None:
    for key, value in err.trailers:
        if key == RETRY_AFTER_TRAILER and value.isdigit():
            return int(value)
    return None


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def http_error(err: ServiceError) -> HttpError:
    """The OpenAI answer for a mesh error (raised here or passed on from upstream)."""
    kind = _KINDS.get(err.code, _INTERNAL)
    param = err.param if isinstance(err, BadField) else ("model" if kind.status == 404 else None)
    out = HttpError(kind.status, error_body(err.message, kind.type, param, kind.code))
    if kind.status in (429, 503):
        ms = _retry_after_ms(err)
        seconds = DEFAULT_RETRY_AFTER_S if ms is None else max(1, math.ceil(ms / 1000))
        # The openai SDK reads retry-after-ms first (exact), then retry-after (whole seconds).
        out.headers["retry-after"] = str(seconds)
        out.headers["retry-after-ms"] = str(ms if ms is not None else seconds * 1000)
    return out


def from_rpc_error(exc: grpc.aio.AioRpcError | grpc.RpcError) -> ServiceError:
    """An upstream status as the mesh's own error (trailers kept for the retry hint)."""
    code: grpc.StatusCode = exc.code()
    details: str = exc.details() or code.name
    trailers: tuple[tuple[str, str], ...] = ()
    metadata = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    for key, value in metadata or ():
        if isinstance(value, str):
            trailers = (*trailers, (key, value))
            if key == EDGE_RATE_LIMITED:
                details = f"rate limited at the edge ({details})"
    return ServiceError.of(code, details, trailers)
