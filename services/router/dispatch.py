"""The router's request path, independent of which public API received the request.

InferenceService and the KServe v2 servicer both call `Dispatcher.stream`; it validates, picks a
server, relays its stream, retries before the first token, and raises RouteError with the gRPC
status the client should get.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Iterable

import grpc
from meshserve.v1 import common_pb2, inference_pb2, modelserver_pb2

from services.common.validation import validate_generate

from . import metrics
from .picker import pick
from .pool import Backend, BackendPool

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 3
# Upstream codes that another replica might not repeat; everything else goes straight back.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE}
PASS_THROUGH = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION}


def merge_chunks(chunks: Iterable[inference_pb2.GenerateResponse]
                 ) -> inference_pb2.GenerateResponse:
    """A streamed answer as one response: texts joined, the last chunk's finish and usage."""
    answer = inference_pb2.GenerateResponse()
    texts: list[str] = []
    for chunk in chunks:
        texts.append(chunk.text)
        answer.token_ids.extend(chunk.token_ids)
        answer.logprobs.extend(chunk.logprobs)
        answer.served_by.CopyFrom(chunk.served_by)
        answer.request_id = chunk.request_id
        if chunk.finish_reason:
            answer.finish_reason = chunk.finish_reason
        if chunk.HasField("usage"):
            answer.usage.CopyFrom(chunk.usage)
    answer.text = "".join(texts)
    return answer


class RouteError(Exception):
    """The request ends with this gRPC status and message."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class ModelAvailability:
    name: str
    ready_replicas: int
    regions: list[str]


class Dispatcher:
    def __init__(self, pool: BackendPool, router_id: str) -> None:
        self._pool = pool
        self.router_id = router_id

    def known_models(self) -> set[str]:
        return self._pool.known_models()

    def models(self) -> list[ModelAvailability]:
        out = []
        for model in sorted(self.known_models()):
            backends = self._pool.candidates(model)
            out.append(ModelAvailability(model, len(backends),
                                         sorted({b.info.region for b in backends})))
        return out

    async def stream(self, request: inference_pb2.GenerateRequest, timeout: float | None
                     ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Chunks of the answer; `timeout` is the client's remaining deadline in seconds."""
        started = time.monotonic()
        priority = (common_pb2.Priority.Name(request.priority)
                    if request.priority in common_pb2.Priority.values() else "INVALID")
        model = request.model if request.model in self.known_models() else "unknown"
        code = "OK"
        try:
            try:
                validate_generate(request)
            except ValueError as exc:
                raise RouteError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            request_id = request.request_id or uuid.uuid4().hex
            first = True
            async for chunk in self._attempts(request, request_id, started, timeout):
                if first and chunk.token_ids:
                    metrics.TTFT.labels(model).observe(time.monotonic() - started)
                    first = False
                yield chunk
        except RouteError as exc:
            code = exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            metrics.REQUESTS.labels(model, code, priority).inc()
            metrics.DURATION.labels(model).observe(time.monotonic() - started)

    def _no_candidates(self, model: str) -> RouteError:
        if model not in self.known_models():
            served = ", ".join(sorted(self.known_models())) or "none"
            return RouteError(grpc.StatusCode.NOT_FOUND,
                              f"model {model!r} is not served by this mesh (served models: {served})")
        return RouteError(grpc.StatusCode.UNAVAILABLE,
                          f"no server can take model {model!r} now (all draining or gone); "
                          "retry shortly")

    async def _attempts(self, request: inference_pb2.GenerateRequest, request_id: str,
                        started: float, timeout: float | None
                        ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        upstream = modelserver_pb2.ModelServerServiceGenerateRequest(
            request_id=request_id, model=request.model, prompt=request.prompt,
            messages=request.messages, sampling=request.sampling, priority=request.priority)
        tried: set[str] = set()
        last_error = ""
        for attempt in range(MAX_ATTEMPTS):
            candidates = self._pool.candidates(request.model)
            if not candidates:
                raise self._no_candidates(request.model)
            backend = pick(candidates, exclude=tried)
            if backend is None:
                break
            tried.add(backend.server_id)
            metrics.PICKS.labels(backend.server_id, "least_outstanding").inc()
            if attempt:
                metrics.RETRIES.labels(request.model).inc()
            remaining = None if timeout is None else timeout - (time.monotonic() - started)
            if remaining is not None and remaining <= 0:
                raise RouteError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while routing")
            sent_any = False
            backend.outstanding += 1
            try:
                async for part in backend.stub.Generate(upstream, timeout=remaining):
                    sent_any = True
                    yield self._wrap(part, backend, request_id)
                backend.record_success()
                return
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
                if code in RETRYABLE:
                    backend.record_failure()
                if sent_any or code not in RETRYABLE:
                    if code in PASS_THROUGH:
                        raise RouteError(code, details) from None
                    raise RouteError(grpc.StatusCode.UNAVAILABLE,
                                     f"server {backend.server_id} failed: {code.name}: {details}"
                                     ) from None
                last_error = f"{backend.server_id}: {code.name}: {details}"
                log.info("attempt %d for %s on %s failed before the first token (%s); retrying",
                         attempt + 1, request_id, backend.server_id, code.name)
            finally:
                backend.outstanding -= 1
        raise RouteError(grpc.StatusCode.UNAVAILABLE,
                         f"every attempt failed for model {request.model!r}; last error: {last_error}")

    def _wrap(self, part: modelserver_pb2.ModelServerServiceGenerateResponse, backend: Backend,
              request_id: str) -> inference_pb2.GenerateResponse:
        out = inference_pb2.GenerateResponse(
            text=part.text, token_ids=part.token_ids, logprobs=part.logprobs,
            finish_reason=part.finish_reason, request_id=request_id)
        if part.HasField("usage"):
            out.usage.CopyFrom(part.usage)
        sb = out.served_by
        sb.server_id = backend.server_id
        sb.region = backend.info.region
        sb.zone = backend.info.zone
        sb.router_id = self.router_id
        sb.simulated = backend.info.simulated
        sb.backend = backend.info.backend
        return out
