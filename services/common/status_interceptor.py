"""One mapping from errors to gRPC status, for every servicer of every MeshServe process.

`new_server` installs `StatusInterceptor`, so servicers stay convert -> call -> convert:
- a `ServiceError` raised anywhere below a servicer ends the call with its code, message and
  trailers (no traceback: it is an answer, not a fault);
- a request that cannot be decoded (corrupt wire format, invalid UTF-8 in a string field) gets
  INVALID_ARGUMENT saying so, before the servicer sees it;
- anything else is a bug: it is logged once with its traceback and an error id, and the caller
  gets INTERNAL with that id, never UNKNOWN.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from .errors import InvalidArgument, ServiceError

log = logging.getLogger(__name__)


class Undecodable:
    """Stands in for a request message whose bytes did not parse."""

    def __init__(self, error: Exception) -> None:
        self.error = error


def _safe_deserializer(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as exc:
            return Undecodable(exc)
    return parse


def _check(request: Any) -> None:
    if isinstance(request, Undecodable):
        raise InvalidArgument(f"the request message could not be decoded ({request.error}); send a valid "
                              "protobuf message (string fields must be valid UTF-8)")


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        _check(request)
        yield request


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    """End the call for an exception that escaped a servicer (raises grpc's AbortError)."""
    if isinstance(exc, ServiceError):
        await context.abort(exc.code, exc.message, trailing_metadata=exc.trailers)
    error_id = uuid.uuid4().hex[:12]
    log.error("internal error %s in %s", error_id, method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL,
                        f"internal error {error_id} in {method}; the server log has the details")


def _wrap_unary(behavior: Callable[..., Awaitable[Any]], method: str, streaming_in: bool):
    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if streaming_in:
                request = _checked(request)
            else:
                _check(request)
            return await behavior(request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - every escape becomes a precise status
            await abort_with(context, exc, method)
    return call


def _wrap_stream(behavior: Callable[..., Any], method: str, streaming_in: bool):
    if not inspect.isasyncgenfunction(behavior):  # a coroutine that writes with context.write
        return _wrap_unary(behavior, method, streaming_in)

    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            if streaming_in:
                request = _checked(request)
            else:
                _check(request)
            async for response in behavior(request, context):
                yield response
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:  # noqa: BLE001 - every escape becomes a precise status
            await abort_with(context, exc, method)
    return call


def wrap_handler(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    deserialize = _safe_deserializer(handler.request_deserializer)
    serialize = handler.response_serializer
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(handler.unary_unary, method, False), deserialize, serialize)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(handler.unary_stream, method, False), deserialize, serialize)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(handler.stream_unary, method, True), deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(handler.stream_stream, method, True), deserialize, serialize)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every method handler once (handlers are cached per method)."""

    def __init__(self) -> None:
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is None or cached[0] is not handler:
            cached = self._wrapped[method] = (handler, wrap_handler(handler, method))
        return cached[1]
