"""Running one generation for a job or batch line through the router's request path.

The request goes through `Dispatcher.stream` (validation, routing, retries, migration) at
SHEDDABLE priority - the background band: engines order their queues by priority and the torch
engine preempts a lower-priority sequence when a more important one needs its place, and the
dispatcher's admission refuses SHEDDABLE work with RESOURCE_EXHAUSTED when every replica is
saturated. The worker then backs off and tries again, holding the message (an in-progress
acknowledgement) so a busy mesh never burns a delivery.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from meshserve.v1 import common_pb2, inference_pb2

from services.common.errors import DeadlineExceeded, ResourceExhausted, ServiceError
from services.common.validation import validate_request
from services.router.convert import merge_chunks
from services.router.dispatch import Dispatcher
from services.router.policy.prefix import render

from . import metrics

#: Lines whose first this-many prompt characters agree share a session, hence a replica: one prefix
#: block of the router's (~16 tokens), so lines that share a system prompt or few-shot block meet.
PREFIX_CHARS = 64
#: Failures that running again will not fix: the job fails at once.
FINAL_CODES = frozenset({"INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "OUT_OF_RANGE",
                         "PERMISSION_DENIED", "UNAUTHENTICATED", "UNIMPLEMENTED"})


@dataclass
class Failure(Exception):
    code: str
    message: str

    @property
    def final(self) -> bool:
        return self.code in FINAL_CODES


def prefix_session(request: inference_pb2.GenerateRequest) -> str:
    """A session id from the prompt's start: lines of a batch that share a prefix (a system prompt,
    a few-shot block) go to the same replica, where the prefix cache already holds it."""
    text = render(request.prompt or "", request.messages)
    return "prefix-" + hashlib.blake2b(text[:PREFIX_CHARS].encode(), digest_size=12).hexdigest()


class Executor:
    def __init__(self, dispatcher: Dispatcher, backoff_s: float = 0.2, backoff_max_s: float = 5.0) -> None:
        self._dispatcher = dispatcher
        self._backoff_s = backoff_s
        self._backoff_max_s = backoff_max_s
        self.backoffs = 0  # RESOURCE_EXHAUSTED answers met (metrics and tests)

    async def generate(self, request: inference_pb2.GenerateRequest, request_id: str, deadline_ms: int,
                       keepalive: Callable[[], Awaitable[None]], share_prefix: bool = False,
                       started: Callable[[], None] | None = None) -> inference_pb2.GenerateResponse:
        """The whole answer, or Failure. `keepalive` runs while it backs off (the caller extends
        its message's ack wait there); `started` is called at the first chunk."""
        msg = inference_pb2.GenerateRequest()
        msg.CopyFrom(request)
        msg.priority = common_pb2.PRIORITY_SHEDDABLE
        msg.request_id = request_id[:128]
        if share_prefix and not msg.session_id:
            msg.session_id = prefix_session(msg)
        try:
            valid = validate_request(msg)
        except ServiceError as exc:
            raise Failure(exc.code.name, exc.message) from None
        pause = self._backoff_s
        while True:
            remaining = deadline_ms / 1000 - time.time()
            if remaining <= 0:
                raise Failure("DEADLINE_EXCEEDED", "the completion window passed before the job could finish")
            try:
                return await self._once(valid, remaining, started)
            except ResourceExhausted:
                self.backoffs += 1
                metrics.BACKOFFS.inc()
                await keepalive()
                await asyncio.sleep(pause * (0.5 + random.random() / 2))
                pause = min(self._backoff_max_s, pause * 2)
            except DeadlineExceeded as exc:
                raise Failure("DEADLINE_EXCEEDED", exc.message) from None
            except ServiceError as exc:
                raise Failure(exc.code.name, exc.message) from None

    async def _once(self, valid, remaining: float, started: Callable[[], None] | None
                    ) -> inference_pb2.GenerateResponse:
        chunks: list[inference_pb2.GenerateResponse] = []
        async with aclosing(self._dispatcher.stream(valid, remaining)) as stream:
            async for chunk in stream:
                if not chunks and started is not None:
                    started()
                chunks.append(chunk)
        return merge_chunks(chunks)
