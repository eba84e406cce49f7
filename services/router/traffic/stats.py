"""Canary figures of this router: per canary and side, requests, replica failures and TTFT over a
sliding window, published to etcd on the router's lease for the control-plane leader to judge.

Counts are kept in one-second slots; a step change (or a new policy generation) starts the window
afresh, so a promotion is judged only on traffic at the new weight. Failures are counted per
attempt: a retry on another replica of the same version hides a failure from the client but not
from the canary's figures.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from meshserve.v1 import traffic_pb2 as tp

from services.common import keyspace
from services.common.lifecycle import now_ms
from services.common.tasks import stop_task
from services.common.traffic import window

log = logging.getLogger(__name__)

PUBLISH_INTERVAL_S = 2.0
#: Stop publishing a canary nobody sent traffic to for this long (its key is deleted).
IDLE_AFTER_S = 120.0


@dataclass
class _Slot:
    second: int
    requests: int = 0
    errors: int = 0
    ttft: dict[int, int] = field(default_factory=dict)


@dataclass
class _Side:
    slots: list[_Slot] = field(default_factory=list)

    def slot(self, second: int) -> _Slot:
        if not self.slots or self.slots[-1].second != second:
            self.slots.append(_Slot(second))
        return self.slots[-1]

    def window(self, now_s: int, window_s: int) -> tp.TargetWindow:
        self.slots = [s for s in self.slots if s.second > now_s - window_s]
        buckets = [0] * window.N_BUCKETS
        out = tp.TargetWindow()
        for s in self.slots:
            out.requests += s.requests
            out.errors += s.errors
            for b, n in s.ttft.items():
                buckets[b] += n
        out.ttft_buckets.extend(buckets)
        out.ttft_p95_s = window.quantile(buckets, 0.95)
        return out


@dataclass
class _Track:
    generation: int
    step: int
    window_s: int
    sides: dict[str, _Side] = field(default_factory=lambda: {"stable": _Side(), "canary": _Side()})
    last_used: float = field(default_factory=time.monotonic)


class Observer:
    """What the dispatcher reports about one request to one side of a canary."""

    def __init__(self, side: _Side) -> None:
        self._side = side

    def attempt(self, failed: bool) -> None:
        slot = self._side.slot(int(time.monotonic()))
        slot.requests += 1
        slot.errors += int(failed)

    def first_token(self, seconds: float) -> None:
        slot = self._side.slot(int(time.monotonic()))
        b = window.bucket(seconds)
        slot.ttft[b] = slot.ttft.get(b, 0) + 1


Put = Callable[[str, bytes], Awaitable[None]]
Delete = Callable[[str], Awaitable[None]]


class CanaryRecorder:
    def __init__(self, router_id: str, put: Put | None = None, delete: Delete | None = None,
                 interval_s: float = PUBLISH_INTERVAL_S) -> None:
        self.router_id = router_id
        self._put, self._delete = put, delete
        self._interval_s = interval_s
        self._tracks: dict[str, _Track] = {}
        self._task: asyncio.Task | None = None

    def observer(self, name: str, generation: int, step: int, window_s: int, side: str) -> Observer:
        track = self._tracks.get(name)
        if track is None or (track.generation, track.step, track.window_s) != (generation, step, window_s):
            track = self._tracks[name] = _Track(generation, step, window_s)
        track.last_used = time.monotonic()
        if self._task is None and self._put is not None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="canary-stats")
        return Observer(track.sides[side])

    def snapshot(self, name: str) -> tp.TrafficStats | None:
        track = self._tracks.get(name)
        if track is None:
            return None
        now_s = int(time.monotonic())
        return tp.TrafficStats(name=name, router_id=self.router_id, generation=track.generation,
                               step=track.step, at_ms=now_ms(),
                               stable=track.sides["stable"].window(now_s, track.window_s),
                               canary=track.sides["canary"].window(now_s, track.window_s))

    async def publish_once(self) -> None:
        assert self._put is not None and self._delete is not None
        now = time.monotonic()
        for name in list(self._tracks):
            key = keyspace.traffic_stats_key(name, self.router_id)
            if now - self._tracks[name].last_used > IDLE_AFTER_S:
                del self._tracks[name]
                await self._delete(key)
                continue
            stats = self.snapshot(name)
            if stats is not None:
                await self._put(key, keyspace.encode(stats))

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("publishing canary figures failed")

    async def close(self) -> None:
        await stop_task(self._task)
