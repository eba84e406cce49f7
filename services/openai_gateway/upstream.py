"""The gateway as a client of InferenceService: one GenerateStream per choice, resumed when a
router dies mid-answer, with the HTTP client's headers passed on as gRPC metadata.

Calling the public gRPC API (through Envoy by default) keeps every rule of the mesh in force for
OpenAI clients: validation, routing, admission, retries before the first token, migration after
it, traffic policies and whatever routers read from metadata (the session header, tenant headers).
Every answer is streamed, also for `stream: false`, so a router that dies mid-answer costs the
HTTP client nothing: `services/client/resumable.py` continues it on another router. A call that
fails before its first chunk is not tried again here: Envoy retried it on another router already,
and the routers retried it on other servers, so the client hears the mesh's answer at once.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncGenerator, Iterable, Sequence
from contextlib import aclosing
from typing import Any, cast

import grpc
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.client import resumable
from services.common.grpc_util import CHANNEL_OPTIONS

from . import metrics
from .errors import from_rpc_error
from .protocol import Job

# Request headers passed on to the mesh as gRPC metadata: the W3C trace context, the caller's
# credentials (an authenticating edge checks them again on the inner call) and every `x-` header
# (session, tenant and other routing headers), except those Envoy owns or that describe this hop.
_FORWARD = frozenset({"authorization", "traceparent", "tracestate", "baggage"})
_NOT_FORWARDED = ("x-envoy-", "x-forwarded-", "x-meshserve-rate-limited", "x-real-ip")
#: Bytes of forwarded metadata at most (gRPC refuses calls whose metadata exceeds 8 KiB).
MAX_FORWARDED_BYTES = 4096
_METADATA_KEY = re.compile(r"[0-9a-z_.-]+")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,100}")


def forwarded_metadata(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The request headers that travel on to the routers, within MAX_FORWARDED_BYTES."""
    out: list[tuple[str, str]] = []
    size = 0
    for name, value in headers:
        key = name.lower()
        if key not in _FORWARD and not (key.startswith("x-") and not key.startswith(_NOT_FORWARDED)):
            continue
        if key.endswith("-bin") or not _METADATA_KEY.fullmatch(key):
            continue
        if not (value.isascii() and value.isprintable()):
            continue
        if size + len(key) + len(value) > MAX_FORWARDED_BYTES:
            continue  # too big to pass on; smaller ones still go
        size += len(key) + len(value)
        out.append((key, value))
    return out


def request_id(headers: Iterable[tuple[str, str]]) -> str:
    """Envoy's x-request-id when it is a usable id (one id in Envoy's access log, the gateway's
    and the routers' logs), else a new one."""
    for name, value in headers:
        if name.lower() == "x-request-id" and _REQUEST_ID.fullmatch(value):
            return value
    return uuid.uuid4().hex


def build_requests(job: Job, rid: str) -> list[inference_pb2.GenerateRequest]:
    """One GenerateRequest per choice; choice i answers prompt i // n. With a seed, copy j of a
    prompt samples with seed + j, so n choices differ and each is reproducible."""
    out = []
    prompts: Sequence[str | None] = job.prompts or (None,)
    for p, prompt in enumerate(prompts):
        for j in range(job.n):
            index = p * job.n + j
            req = inference_pb2.GenerateRequest(
                model=job.model, session_id=job.session_id,
                request_id=rid if job.choices == 1 else f"{rid}-{index}")
            if prompt is None:
                for m in job.messages:
                    req.messages.add(role=m.role, content=m.content)
            else:
                req.prompt = prompt
            s = job.sampling
            req.sampling.max_tokens = s.max_tokens
            req.sampling.temperature = s.temperature
            req.sampling.top_p = s.top_p
            req.sampling.top_k = s.top_k
            req.sampling.stop.extend(s.stop)
            req.sampling.logprobs = s.logprobs
            if s.seed is not None:
                req.sampling.seed = (s.seed + j) % (1 << 64)
            if job.priority is not None:
                req.priority = common_pb2.Priority.ValueType(int(job.priority))
            out.append(req)
    return out


class _Counted:
    """The stub with this request's metadata; every call after the first is a resume."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub, metadata: Sequence[tuple[str, str]]) -> None:
        self._stub = stub
        self._metadata = tuple(metadata)
        self.calls = 0

    def GenerateStream(self, request: inference_pb2.GenerateRequest, timeout: float | None = None) -> Any:
        self.calls += 1
        if self.calls > 1:
            metrics.RESUMES.inc()
        return self._stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)


class Upstream:
    """A channel to InferenceService: Envoy's address, or routers directly (a gRPC target such as
    `ipv4:10.0.0.1:8001,10.0.0.2:8001` or `dns:///routers:8001`, balanced round robin)."""

    def __init__(self, target: str, max_resumes: int = resumable.DEFAULT_MAX_RESUMES) -> None:
        options = [*CHANNEL_OPTIONS, ("grpc.lb_policy_name", "round_robin")]
        self._channel = grpc.aio.insecure_channel(target, options=options)
        self._stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._max_resumes = max_resumes

    async def close(self) -> None:
        await self._channel.close()

    async def models(self, metadata: Sequence[tuple[str, str]], timeout: float = 10.0
                     ) -> inference_pb2.ListModelsResponse:
        try:
            response: inference_pb2.ListModelsResponse = await self._stub.ListModels(
                inference_pb2.ListModelsRequest(), timeout=timeout, metadata=tuple(metadata))
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None
        return response

    async def _one(self, request: inference_pb2.GenerateRequest, metadata: Sequence[tuple[str, str]]
                   ) -> AsyncGenerator[inference_pb2.GenerateResponse]:
        stub = _Counted(self._stub, metadata)
        stream = cast(AsyncGenerator[inference_pb2.GenerateResponse],
                      resumable.astream(stub, request, max_resumes=self._max_resumes,
                                        retry_unstarted=False))
        try:
            async with aclosing(stream) as chunks:
                async for chunk in chunks:
                    yield chunk
        except grpc.aio.AioRpcError as exc:
            raise from_rpc_error(exc) from None

    async def choices(self, job: Job, rid: str, metadata: Sequence[tuple[str, str]]
                      ) -> AsyncGenerator[tuple[int, inference_pb2.GenerateResponse]]:
        """(choice index, chunk) as the choices' streams produce them. The first failure of any
        choice ends the whole answer (its error is raised) and cancels the others."""
        requests = build_requests(job, rid)
        if len(requests) == 1:
            async with aclosing(self._one(requests[0], metadata)) as chunks:
                async for chunk in chunks:
                    yield 0, chunk
            return
        queue: asyncio.Queue[tuple[int, inference_pb2.GenerateResponse | None, BaseException | None]] = \
            asyncio.Queue(maxsize=4 * len(requests))

        async def pump(i: int, request: inference_pb2.GenerateRequest) -> None:
            try:
                async with aclosing(self._one(request, metadata)) as chunks:
                    async for chunk in chunks:
                        await queue.put((i, chunk, None))
                await queue.put((i, None, None))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer, which raises it
                await queue.put((i, None, exc))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            running = len(tasks)
            while running:
                i, item, exc = await queue.get()
                if exc is not None:
                    raise exc
                if item is None:
                    running -= 1
                else:
                    yield i, item
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
