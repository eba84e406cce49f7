"""Closed-loop load through Envoy: workers send requests back to back and record each outcome
(wall-clock start and end, latency, which deployment and server answered, the route, errors, and
whether a sim answer's text is exactly what the prompt gives)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc


@dataclass
class Outcome:
    started: float  # wall clock, seconds
    ended: float
    latency: float
    deployment: str = ""
    server: str = ""
    route: str = ""
    error: str = ""
    text_ok: bool = True


def sim_text(prompt: str, n: int) -> str:
    words = prompt.split()
    return " ".join(words[i % len(words)] for i in range(n))


class Load:
    def __init__(self, address: str, model: str, workers: int, max_tokens: int = 2, stream: bool = False,
                 check_text: bool = True) -> None:
        self.address, self.model, self.workers = address, model, workers
        self.max_tokens, self.stream, self.check_text = max_tokens, stream, check_text
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()
        self._ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self._channel: grpc.aio.Channel | None = None
        self.limit: int | None = None  # stop after this many requests
        self.on_outcome: Callable[[Outcome], None] | None = None

    def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = inference_pb2_grpc.InferenceServiceStub(self._channel)
        self._tasks = [asyncio.create_task(self._worker(stub)) for _ in range(self.workers)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._channel is not None:
            await self._channel.close()

    async def run(self, n: int) -> list[Outcome]:
        """Exactly n requests, then stop."""
        self.limit = n
        self.start()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stop()
        return self.outcomes

    async def _worker(self, stub: inference_pb2_grpc.InferenceServiceStub) -> None:
        while not self._stop.is_set():
            i = next(self._ids)
            if self.limit is not None and i >= self.limit:
                return
            prompt = f"w{i % 97} alpha beta gamma {i}"
            req = inference_pb2.GenerateRequest(model=self.model, prompt=prompt, request_id=f"b{i}")
            req.sampling.max_tokens = self.max_tokens
            outcome = await self._one(stub, req, prompt)
            self.outcomes.append(outcome)
            if self.on_outcome is not None:
                self.on_outcome(outcome)

    async def _one(self, stub: inference_pb2_grpc.InferenceServiceStub, req: inference_pb2.GenerateRequest,
                   prompt: str) -> Outcome:
        wall, t0 = time.time(), time.monotonic()
        parts: list[str] = []
        last = inference_pb2.GenerateResponse()
        try:
            if self.stream:
                async for chunk in stub.GenerateStream(req, timeout=60):
                    parts.append(chunk.text)
                    last = chunk
            else:
                last = await stub.Generate(req, timeout=60)
                parts.append(last.text)
        except grpc.aio.AioRpcError as exc:
            return Outcome(wall, time.time(), time.monotonic() - t0, error=f"{exc.code().name}: {exc.details()}")
        text_ok = not self.check_text or "".join(parts) == sim_text(prompt, self.max_tokens)
        sb = last.served_by
        return Outcome(wall, time.time(), time.monotonic() - t0, sb.deployment, sb.server_id, sb.route,
                       text_ok=text_ok)
