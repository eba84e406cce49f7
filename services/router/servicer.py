"""InferenceService on the router: validate, pick a server, relay its stream, map failures.

A failure before the first token is retried on another candidate (bounded); after tokens have
been sent, the error goes to the client (mid-stream migration arrives with the router issue).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

import grpc
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, modelserver_pb2

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


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, pool: BackendPool, router_id: str) -> None:
        self._pool = pool
        self._router_id = router_id

    # --- public RPCs -----------------------------------------------------------------------

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        answer = inference_pb2.GenerateResponse()
        texts: list[str] = []
        async for chunk in self._serve(request, context):
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

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for chunk in self._serve(request, context):
            yield chunk

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        out = inference_pb2.ListModelsResponse()
        for model in sorted(self._known_models()):
            backends = self._pool.candidates(model)
            out.models.add(name=model, ready_replicas=len(backends),
                           regions=sorted({b.info.region for b in backends}))
        return out

    # --- the request path ------------------------------------------------------------------

    async def _serve(self, request: inference_pb2.GenerateRequest,
                     context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        started = time.monotonic()
        priority = common_pb2.Priority.Name(request.priority) if request.priority in \
            common_pb2.Priority.values() else "INVALID"
        model = request.model if request.model in self._known_models() else "unknown"
        code = "OK"
        try:
            try:
                validate_generate(request)
            except ValueError as exc:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            request_id = request.request_id or uuid.uuid4().hex
            first = True
            async for chunk in self._dispatch(request, request_id, context):
                if first and chunk.token_ids:
                    metrics.TTFT.labels(model).observe(time.monotonic() - started)
                    first = False
                yield chunk
        except _Abort as exc:
            code = exc.code.name
            await context.abort(exc.code, exc.message)
        except asyncio.CancelledError:
            code = "CANCELLED"
            raise
        finally:
            metrics.REQUESTS.labels(model, code, priority).inc()
            metrics.DURATION.labels(model).observe(time.monotonic() - started)

    def _known_models(self) -> set[str]:
        return {m for b in self._pool.backends.values() for m in b.info.models}

    async def _dispatch(self, request: inference_pb2.GenerateRequest, request_id: str,
                        context: grpc.aio.ServicerContext
                        ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        upstream = modelserver_pb2.ModelServerServiceGenerateRequest(
            request_id=request_id, model=request.model, prompt=request.prompt,
            messages=request.messages, sampling=request.sampling, priority=request.priority)
        tried: set[str] = set()
        last_error = ""
        for attempt in range(MAX_ATTEMPTS):
            candidates = self._pool.candidates(request.model)
            if not candidates:
                if request.model not in self._known_models():
                    served = ", ".join(sorted(self._known_models())) or "none"
                    raise _Abort(grpc.StatusCode.NOT_FOUND,
                                 f"model {request.model!r} is not served by this mesh "
                                 f"(served models: {served})")
                raise _Abort(grpc.StatusCode.UNAVAILABLE,
                             f"no server can take model {request.model!r} now (all draining or "
                             "gone); retry shortly")
            backend = pick(candidates, exclude=tried)
            if backend is None:
                break
            tried.add(backend.server_id)
            metrics.PICKS.labels(backend.server_id, "least_outstanding").inc()
            if attempt:
                metrics.RETRIES.labels(request.model).inc()
            sent_any = False
            backend.outstanding += 1
            try:
                remaining = context.time_remaining()
                call = backend.stub.Generate(upstream, timeout=remaining)
                async for part in call:
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
                        raise _Abort(code, details) from None
                    raise _Abort(grpc.StatusCode.UNAVAILABLE,
                                 f"server {backend.server_id} failed: {code.name}: {details}") from None
                last_error = f"{backend.server_id}: {code.name}: {details}"
                log.info("attempt %d for %s on %s failed before the first token (%s); retrying",
                         attempt + 1, request_id, backend.server_id, code.name)
            finally:
                backend.outstanding -= 1
        raise _Abort(grpc.StatusCode.UNAVAILABLE,
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
        sb.router_id = self._router_id
        sb.simulated = backend.info.simulated
        sb.backend = backend.info.backend
        return out
