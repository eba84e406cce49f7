"""What the control plane did, sampled every second while a phase runs: desired, placed and ready
replicas per model, every decision (from ExplainAutoscale's recent list, merged), the limit it
reported, and any breach of max_replicas or a budget (placed replicas per region vs its budget)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import grpc
from meshserve.v1 import autoscale_pb2 as asp
from meshserve.v1 import autoscale_pb2_grpc, controlplane_pb2_grpc
from meshserve.v1 import controlplane_pb2 as cp


@dataclass
class Sample:
    at: float
    desired: int
    placed: int
    ready: int
    limit: str


@dataclass
class ModelWatch:
    model: str
    max_replicas: int
    region: str
    budget: int = 0  # the region's replica budget (0 = none)
    samples: list[Sample] = field(default_factory=list)
    decisions: dict[tuple[int, int, int], asp.AutoscaleDecision] = field(default_factory=dict)
    limits_seen: set[str] = field(default_factory=set)
    breaches: list[str] = field(default_factory=list)

    def decided(self) -> list[asp.AutoscaleDecision]:
        return [self.decisions[k] for k in sorted(self.decisions)]

    def replica_seconds(self, start: float, end: float) -> float:
        """Placed replicas integrated over [start, end] (a loading replica holds its GPU too)."""
        total = 0.0
        for a, b in zip(self.samples, self.samples[1:], strict=False):
            lo, hi = max(a.at, start), min(b.at, end)
            if hi > lo:
                total += a.placed * (hi - lo)
        return total


class Watcher:
    def __init__(self, controlplane: str, watches: list[ModelWatch], interval_s: float = 1.0) -> None:
        self._address = controlplane
        self.watches = watches
        self.interval_s = interval_s
        self._task: asyncio.Task | None = None

    async def __aenter__(self) -> Watcher:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._once()  # decisions made since the last sample

    async def _once(self) -> None:
        async with grpc.aio.insecure_channel(self._address) as channel:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await self._round(channel)

    async def _round(self, channel: grpc.aio.Channel) -> None:
        auto = autoscale_pb2_grpc.AutoscaleServiceStub(channel)
        ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(channel)
        placements = (await ctl.ListPlacements(cp.ListPlacementsRequest(), timeout=5)).placements
        for w in self.watches:
            await self._sample(auto, w, placements)

    async def _run(self) -> None:
        async with grpc.aio.insecure_channel(self._address) as channel:
            while True:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self._round(channel)
                await asyncio.sleep(self.interval_s)

    async def _sample(self, auto, w: ModelWatch, placements) -> None:
        e = await auto.ExplainAutoscale(asp.ExplainAutoscaleRequest(model=w.model), timeout=5)
        now = time.time()
        placed = [p for p in placements if p.model == w.model]
        w.samples.append(Sample(now, e.desired_replicas, len(placed), e.ready_replicas, e.limit))
        if e.limit:
            w.limits_seen.add(e.limit)
        for d in e.recent:
            w.decisions[(d.at_ms, d.from_replicas, d.to_replicas)] = d
            if d.to_replicas > w.max_replicas:
                w.breaches.append(f"decision to {d.to_replicas} above max {w.max_replicas}")
        if e.desired_replicas > w.max_replicas:
            w.breaches.append(f"desired {e.desired_replicas} above max {w.max_replicas} at {now:.0f}")
        in_region = sum(1 for p in placements if p.region == w.region)
        if w.budget and in_region > w.budget:
            w.breaches.append(f"{in_region} replicas placed in region {w.region}, budget {w.budget}")
