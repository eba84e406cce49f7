"""Open-loop load through Envoy: requests start at their arrival times whatever happens to earlier
ones (users do not wait for each other), each a GenerateStream so time to first token is seen.
Every request is recorded; the number in flight is what "load" means for the scale-up delay."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc


@dataclass
class Request:
    model: str
    sent: float  # wall clock
    first: float | None = None
    done: float | None = None
    code: str = ""  # "" while running, "OK" or the status name

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent


@dataclass
class Load:
    address: str
    model: str
    max_tokens: int
    prompt: str
    timeout_s: float = 90.0
    requests: list[Request] = field(default_factory=list)
    in_flight: int = 0
    peak_in_flight: list[tuple[float, int]] = field(default_factory=list)  # (wall time, in flight)

    async def one(self, stub: inference_pb2_grpc.InferenceServiceStub) -> None:
        req = inference_pb2.GenerateRequest(model=self.model, prompt=self.prompt)
        req.sampling.max_tokens = self.max_tokens
        rec = Request(self.model, time.time())
        self.requests.append(rec)
        self.in_flight += 1
        self.peak_in_flight.append((rec.sent, self.in_flight))
        try:
            async for chunk in stub.GenerateStream(req, timeout=self.timeout_s):
                if rec.first is None and chunk.token_ids:
                    rec.first = time.time()
            rec.code = "OK"
        except grpc.aio.AioRpcError as exc:
            rec.code = exc.code().name
        finally:
            rec.done = time.time()
            self.in_flight -= 1
            self.peak_in_flight.append((rec.done, self.in_flight))

    async def play(self, times: list[float]) -> None:
        """Send a request at each offset (seconds from now); wait for all to end."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            start = time.monotonic()
            tasks = []
            for at in times:
                delay = start + at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self.one(stub)))
            await asyncio.gather(*tasks)

    async def burst(self, n: int) -> None:
        await self.play([0.0] * n)
