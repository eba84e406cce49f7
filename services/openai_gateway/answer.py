"""Turns the choices' chunk streams into an HTTP answer: one JSON body, or server-sent events.

Both wait for the first chunk before anything is sent, so every failure before the first token
(unknown model, shed, no ready replica, edge rate limit) gets its own HTTP status and OpenAI
error body, streaming or not. After that a failure can only be told in the stream: an event
`data: {"error": {...}}` (the openai SDK raises it as an APIError), with no `[DONE]` after it.

A client that stops reading is let go after `slow_consumer_s` (the write blocks once the socket
buffers are full, and the whole chain behind it pauses meanwhile), which also cancels its
generations upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

from aiohttp import web
from meshserve.v1 import inference_pb2

from services.common.errors import ServiceError

from . import metrics, render
from .errors import error_body, http_error
from .protocol import Job

log = logging.getLogger(__name__)

Chunks = AsyncGenerator[tuple[int, inference_pb2.GenerateResponse]]


def served_headers(rid: str, chunk: inference_pb2.GenerateResponse) -> dict[str, str]:
    """Where the answer came from (the first chunk's replica; a resumed stream may move on)."""
    sb = chunk.served_by
    return {"x-request-id": rid, "x-meshserve-server": sb.server_id, "x-meshserve-router": sb.router_id,
            "x-meshserve-backend": sb.backend, "x-meshserve-simulated": "true" if sb.simulated else "false"}


async def whole(job: Job, head: render.Header, rid: str, chunks: Chunks, endpoint: str,
                started: float) -> web.Response:
    choices = [render.Choice(i, prefix=_echo(job, i)) for i in range(job.choices)]
    first: inference_pb2.GenerateResponse | None = None
    async with aclosing(chunks):
        async for i, chunk in chunks:
            if first is None:
                first = chunk
                metrics.TTFT.labels(endpoint).observe(time.monotonic() - started)
            choices[i].add(chunk)
    if first is None:
        raise ServiceError("the mesh ended the answer without a chunk")
    head.fingerprint = render.fingerprint(first)
    body = (render.chat_response(job, head, choices) if job.kind == "chat"
            else render.completion_response(job, head, choices))
    return web.json_response(body, headers=served_headers(rid, first))


def _echo(job: Job, index: int) -> str:
    return job.prompts[index // job.n] if job.echo else ""


class _Events:
    """Server-sent events onto one response, each write bounded by the slow-consumer limit."""

    def __init__(self, response: web.StreamResponse, slow_consumer_s: float) -> None:
        self._response = response
        self._limit = slow_consumer_s

    async def send(self, data: dict[str, Any] | str) -> None:
        text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
        await asyncio.wait_for(self._response.write(f"data: {text}\n\n".encode()), self._limit)

    async def tell(self, error: dict[str, Any]) -> None:
        """The last event of a failed stream; a client that is gone by now is not told."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            await self.send(error)


class _Stream:
    """Per-choice state of one streamed answer."""

    def __init__(self, job: Job, head: render.Header) -> None:
        self.job = job
        self.head = head
        self.choices = [render.Choice(i, prefix=_echo(job, i)) for i in range(job.choices)]
        self.started = [False] * job.choices
        self.offsets = [len(c.prefix) for c in self.choices]

    def event(self, i: int, chunk: inference_pb2.GenerateResponse) -> dict[str, Any] | None:
        """The event for one chunk, or None when it carries nothing a client would see."""
        choice = self.choices[i]
        if chunk.HasField("usage"):
            choice.usage = chunk
        first = not self.started[i]
        if not (first or chunk.text or chunk.token_ids or chunk.finish_reason):
            return None
        self.started[i] = True
        if self.job.kind == "chat":
            return render.chat_chunk(self.job, self.head, i, chunk, first)
        text = (choice.prefix if first else "") + chunk.text
        out = render.completion_chunk(self.job, self.head, i, text, chunk, self.offsets[i])
        self.offsets[i] += len(chunk.text) + (len(choice.prefix) if first else 0)
        return out


async def streamed(request: web.Request, job: Job, head: render.Header, rid: str, chunks: Chunks,
                   endpoint: str, started: float, slow_consumer_s: float) -> web.StreamResponse:
    async with aclosing(chunks):
        first = await anext(chunks, None)  # a failure here is still an HTTP error status
        if first is None:
            raise ServiceError("the mesh ended the answer without a chunk")
        metrics.TTFT.labels(endpoint).observe(time.monotonic() - started)
        head.fingerprint = render.fingerprint(first[1])
        response = web.StreamResponse(headers={
            "content-type": "text/event-stream", "cache-control": "no-cache",
            **served_headers(rid, first[1])})
        await response.prepare(request)
        events = _Events(response, slow_consumer_s)
        state = _Stream(job, head)
        try:
            await _relay(events, state, first, chunks)
        except ServiceError as err:
            metrics.STREAM_ERRORS.labels(err.code.name.lower()).inc()
            log.info("stream %s failed after its first chunk: %s", rid, err)
            await events.tell(http_error(err).body)
        except (TimeoutError, ConnectionError) as exc:
            reason = "slow_consumer" if isinstance(exc, TimeoutError) else "client_gone"
            metrics.STREAM_ERRORS.labels(reason).inc()
            log.info("stream %s: %s; cancelling its generation", rid, reason)
            if request.transport is not None:
                request.transport.abort()
        except Exception:  # a bug after the headers went out: say so in the stream
            metrics.STREAM_ERRORS.labels("internal").inc()
            log.exception("bug while streaming %s", rid)
            await events.tell(error_body(f"internal error while streaming (request {rid}); the gateway "
                                         "logged it", "server_error", None, "internal_error"))
        return response


async def _relay(events: _Events, state: _Stream, first: tuple[int, inference_pb2.GenerateResponse],
                 chunks: Chunks) -> None:
    event = state.event(*first)
    if event is not None:
        await events.send(event)
    async for i, chunk in chunks:
        event = state.event(i, chunk)
        if event is not None:
            await events.send(event)
    if state.job.include_usage:
        await events.send(render.usage_chunk(state.job, state.head, state.choices))
    await events.send("[DONE]")
