"""Doing one attempt: call one replica, relay its chunks, and record how it ended.

No decisions here (dispatch.decide makes them from the `Outcome`). An attempt ends in one of three
ways: the upstream stream completed; the server answered with a status; or the router abandoned
the call - its watchdog saw no token in time, or the pool abandoned it because the server hung,
left or was marked NOT_SERVING. A cancellation the client did not ask for is always one of the
latter, never silence.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass

import grpc
from meshserve.v1 import inference_pb2, modelserver_pb2

from . import metrics
from .convert import public_chunk
from .replica import AttemptHandle, Replica


@dataclass
class Outcome:
    tokens: int = 0  # tokens relayed to the client by this attempt
    chunks: int = 0  # chunks relayed (a text-only stop chunk counts)
    done: bool = False  # the upstream stream completed
    code: grpc.StatusCode | None = None  # the server's status when it failed
    details: str = ""
    abandoned: str = ""  # why the router gave the call up (stalled, hung, left, ...)
    connection_lost: bool = False  # the channel was not READY when it failed: the server, not the request

    def label(self) -> str:
        """How it ended, for metrics: OK, the server's status name, ABANDONED or CANCELLED (the
        client went away mid-attempt)."""
        if self.abandoned:
            return "ABANDONED"
        if self.code is not None:
            return self.code.name
        return "OK" if self.done else "CANCELLED"

    def describe(self) -> str:
        if self.abandoned:
            return f"abandoned: {self.abandoned}"
        return f"{self.code.name if self.code else 'OK'}: {self.details}"


class Watchdog:
    """Abandons an attempt that stays silent too long (the per-attempt deadline): no first chunk
    within `first_s`, or a gap of `stall_s` between chunks. One timer per attempt, never moved by
    a chunk: a chunk only records when it came; the timer re-arms for what is left. Time spent
    handing a chunk to a client that is slow to read is the client's, not the server's: the
    relay marks it (`hold` / `chunk` again when the hand-off ends) and the watchdog waits."""

    def __init__(self, handle: AttemptHandle, first_s: float, stall_s: float) -> None:
        self._handle = handle
        self._first_s, self._stall_s = first_s, stall_s
        self._started = time.monotonic()
        self._last: float | None = None
        self._held = False
        self._loop = asyncio.get_running_loop()
        self._timer = self._loop.call_later(min(first_s, stall_s), self._check)

    def chunk(self, now: float) -> None:
        """A chunk arrived (or the client took the last one) at `now`."""
        self._last = now
        self._held = False

    def hold(self) -> None:
        """The relay waits for the client, not for the server."""
        self._held = True

    def _check(self) -> None:
        limit = self._first_s if self._last is None else self._stall_s
        left = (self._started if self._last is None else self._last) + limit - time.monotonic()
        if left > 0 or self._held:
            self._timer = self._loop.call_later(max(left, limit / 4), self._check)
            return
        what = "token" if self._last is None else "further token"
        self._handle.abort(f"no {what} within {limit:g}s (stalled)")

    def stop(self) -> None:
        self._timer.cancel()


class Attempt:
    """One upstream call. Iterate `relay()` for the client's chunks; read `outcome` afterwards."""

    def __init__(self, replica: Replica, request: modelserver_pb2.ModelServerServiceGenerateRequest,
                 template: inference_pb2.GenerateResponse, timeout: float | None, first_token_s: float,
                 stall_s: float, metadata: Sequence[tuple[str, str]] = ()) -> None:
        self.replica = replica
        self._metadata = tuple(metadata) or None  # the trace context for the model server
        self._request = request
        self._template = template
        self._timeout = timeout
        self._first_token_s, self._stall_s = first_token_s, stall_s
        self.outcome = Outcome()
        self.token_ids: list[int] = []

    async def relay(self) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        replica, out = self.replica, self.outcome
        link = replica.link
        call = (link.stub.Generate(self._request, timeout=self._timeout, metadata=self._metadata)
                if self._metadata else link.stub.Generate(self._request, timeout=self._timeout))
        handle = AttemptHandle(call)
        link.attempts.add(handle)
        replica.outstanding += 1
        watchdog = Watchdog(handle, self._first_token_s, self._stall_s)
        try:
            async for part in call:
                received = time.monotonic()
                watchdog.chunk(received)
                chunk = public_chunk(part, self._template)
                self.token_ids.extend(part.token_ids)
                out.tokens += len(part.token_ids)
                out.chunks += 1
                metrics.OVERHEAD_RELAY.observe(time.monotonic() - received)
                watchdog.hold()
                yield chunk
                watchdog.chunk(time.monotonic())
            out.done = True
        except grpc.aio.AioRpcError as exc:
            out.code, out.details = exc.code(), exc.details() or ""
            out.abandoned = handle.cause
            out.connection_lost = not link.channel_ready()
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the client went away (or the router is stopping)
            out.abandoned = handle.cause or "the upstream call was cancelled"
        finally:
            watchdog.stop()
            replica.outstanding -= 1
            link.attempts.discard(handle)
            if not call.done():
                call.cancel()
