"""Streams that survive a router's death: resume from the tokens already received.

When a router dies mid-stream, Envoy can only reset the client's HTTP/2 stream (gRPC reports
INTERNAL "RST_STREAM ... error code 0", or UNAVAILABLE on a dropped connection); it cannot
retry, because bytes already reached the client. The public API lets the client continue the
same answer instead: send the same request again (same request_id) with `resume_token_ids` = the
token ids received so far, and the answer continues after them - for greedy decoding exactly as
if nothing had broken - on whichever router Envoy picks. Usage on the last chunk counts the
whole answer. docs/client-resume.md describes the protocol for other languages.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Protocol

import grpc
from meshserve.v1 import inference_pb2


class StreamingStub(Protocol):
    """An InferenceService stub (sync or grpc.aio), or anything that wraps one."""

    def GenerateStream(self, request: inference_pb2.GenerateRequest, timeout: float | None = None) -> Any: ...


#: Most resumes of one request (each after the stream broke once).
DEFAULT_MAX_RESUMES = 5


def resumable(code: grpc.StatusCode, details: str) -> bool:
    """A broken transport (the router or a hop died), not an answer about the request."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.INTERNAL and "RST_STREAM" in (details or "")


def _prepared(request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateRequest:
    out = inference_pb2.GenerateRequest()
    out.CopyFrom(request)
    if not out.request_id:
        out.request_id = uuid.uuid4().hex  # the same id across resumes ties them together in logs
    return out


def _next(request: inference_pb2.GenerateRequest, received: list[int]) -> inference_pb2.GenerateRequest:
    out = inference_pb2.GenerateRequest()
    out.CopyFrom(request)
    del out.resume_token_ids[:]
    out.resume_token_ids.extend(received)
    return out


def _pause(resumes: int) -> float:
    return min(1.0, 0.05 * 2 ** (resumes - 1)) * (0.5 + random.random() / 2)


def stream(stub: StreamingStub, request: inference_pb2.GenerateRequest,
           timeout: float | None = None, max_resumes: int = DEFAULT_MAX_RESUMES
           ) -> Iterator[inference_pb2.GenerateResponse]:
    """GenerateStream that resumes after a broken stream; chunks are never repeated or lost."""
    request = _prepared(request)
    deadline = None if timeout is None else time.monotonic() + timeout
    received = list(request.resume_token_ids)
    resumes = 0
    while True:
        left = None if deadline is None else deadline - time.monotonic()
        try:
            for chunk in stub.GenerateStream(_next(request, received), timeout=left):
                received.extend(chunk.token_ids)
                yield chunk
            return
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details() or ""
            out_of_time = deadline is not None and time.monotonic() >= deadline
            if not resumable(code, details) or resumes >= max_resumes or out_of_time:
                raise
            resumes += 1
            time.sleep(_pause(resumes))


async def astream(stub: StreamingStub, request: inference_pb2.GenerateRequest,
                  timeout: float | None = None, max_resumes: int = DEFAULT_MAX_RESUMES,
                  retry_unstarted: bool = True) -> AsyncIterator[inference_pb2.GenerateResponse]:
    """The asyncio version of `stream`, for a stub on a grpc.aio channel.

    `retry_unstarted=False`: a call that fails before its first chunk is not tried again. For a
    caller behind Envoy, which already retries those on another router, so a mesh that says
    UNAVAILABLE is not asked again and again (the OpenAI gateway)."""
    request = _prepared(request)
    loop = asyncio.get_running_loop()
    deadline = None if timeout is None else loop.time() + timeout
    received = list(request.resume_token_ids)
    started = len(received)
    resumes = 0
    while True:
        left = None if deadline is None else deadline - loop.time()
        try:
            async for chunk in stub.GenerateStream(_next(request, received), timeout=left):
                received.extend(chunk.token_ids)
                yield chunk
            return
        except grpc.aio.AioRpcError as exc:
            out_of_time = deadline is not None and loop.time() >= deadline
            unstarted = len(received) == started and not retry_unstarted
            if (not resumable(exc.code(), exc.details() or "") or resumes >= max_resumes or out_of_time
                    or unstarted):
                raise
            resumes += 1
            await asyncio.sleep(_pause(resumes))
