"""A steady number of concurrent clients through Envoy, each answer recorded for an exact check.

Streaming clients use `services.client.resumable.astream`, so they resume after a broken stream
as a real client would; every call it makes after the first is counted as a resume.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import grpc
from meshserve.v1 import inference_pb2

from services.client import resumable

from .answers import expected_answer
from .record import Record

#: Most requests one worker sends in a phase (a bound on the loop, far above what a phase needs).
MAX_PER_WORKER = 10_000
#: Pause after a failed request, so a worker whose every call fails does not spin.
FAIL_PAUSE_S = 0.05


@dataclass(frozen=True)
class LoadSpec:
    model: str
    concurrency: int
    tokens: int
    unary_workers: int = 0  # workers that call Generate (the rest stream)
    timeout_s: float = 90.0  # each request's deadline, as a client would set it
    #: Worker i starts i/concurrency of this later, so requests arrive steadily rather than in
    #: waves (set it to about one answer's duration).
    stagger_s: float = 0.0


class _CountingStub:
    """Wraps the stub for astream: every GenerateStream call after the first is a resume."""

    def __init__(self, stub: Any, record: Record) -> None:
        self._stub, self._record = stub, record

    def GenerateStream(self, request: inference_pb2.GenerateRequest, timeout: float | None = None) -> Any:
        self._record.calls += 1
        return self._stub.GenerateStream(request, timeout=timeout)


def _request(rec: Record) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=rec.model, prompt=rec.expected.prompt,
                                        request_id=rec.request_id)
    req.sampling.max_tokens = len(rec.expected.token_ids)
    return req


async def stream_one(stub: Any, rec: Record, timeout: float) -> None:
    try:
        async for c in resumable.astream(_CountingStub(stub, rec), _request(rec), timeout=timeout):
            rec.add(time.monotonic(), c.text, list(c.token_ids), c.served_by.server_id,
                    c.served_by.router_id, c.finish_reason, c.usage.completion_tokens)
        rec.finish(time.monotonic())
    except grpc.aio.AioRpcError as exc:
        rec.fail(time.monotonic(), exc.code().name, exc.details() or "")
    except Exception as exc:  # noqa: BLE001 - recorded as a failure, never hidden
        rec.fail(time.monotonic(), "CLIENT_ERROR", repr(exc)[:300])


async def unary_one(stub: Any, rec: Record, timeout: float) -> None:
    rec.calls = 1
    try:
        r = await stub.Generate(_request(rec), timeout=timeout)
        rec.add(time.monotonic(), r.text, list(r.token_ids), r.served_by.server_id,
                r.served_by.router_id, r.finish_reason, r.usage.completion_tokens)
        rec.finish(time.monotonic())
    except grpc.aio.AioRpcError as exc:
        rec.fail(time.monotonic(), exc.code().name, exc.details() or "")
    except Exception as exc:  # noqa: BLE001 - recorded as a failure, never hidden
        rec.fail(time.monotonic(), "CLIENT_ERROR", repr(exc)[:300])


class Load:
    """`concurrency` workers, each sending its next request as soon as the last one ended."""

    def __init__(self, stub: Any, spec: LoadSpec, tag: str) -> None:
        self.stub, self.spec, self.tag = stub, spec, tag
        self.records: list[Record] = []
        self._stopping = False
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.spec.concurrency)]

    async def _worker(self, i: int) -> None:
        unary = i < self.spec.unary_workers
        await asyncio.sleep(self.spec.stagger_s * i / max(1, self.spec.concurrency))
        for n in range(MAX_PER_WORKER):
            if self._stopping:
                return
            rec = Record(f"{self.tag}-{i}-{n}", "unary" if unary else "stream", self.spec.model,
                         expected_answer(f"{self.tag}{i}x{n}", self.spec.tokens), time.monotonic())
            self.records.append(rec)
            await (unary_one if unary else stream_one)(self.stub, rec, self.spec.timeout_s)
            if rec.error is not None:
                await asyncio.sleep(FAIL_PAUSE_S)

    async def stop(self, grace_s: float) -> int:
        """Send nothing new; give requests in flight `grace_s` to end, then cancel the rest (they
        stay without a final status). Returns how many were cut off."""
        self._stopping = True
        if not self._tasks:
            return 0
        _, pending = await asyncio.wait(self._tasks, timeout=grace_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        return len(pending)

    def in_flight(self) -> list[Record]:
        return [r for r in self.records if r.ended_at is None]

    def streaming_on(self, t: float) -> dict[str, list[Record]]:
        """Requests streaming at time t, by server."""
        out: dict[str, list[Record]] = {}
        for r in self.in_flight():
            seg = r.segment_at(t)
            if seg is not None:
                out.setdefault(seg.server, []).append(r)
        return out

    def routed_by(self, t: float) -> dict[str, list[Record]]:
        """Requests streaming at time t, by router."""
        out: dict[str, list[Record]] = {}
        for r in self.in_flight():
            seg = r.segment_at(t)
            if seg is not None:
                out.setdefault(seg.router, []).append(r)
        return out
