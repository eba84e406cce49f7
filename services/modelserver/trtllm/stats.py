"""Load reports from TensorRT-LLM's iteration stats (`LLM.get_stats_async`, with
`enable_iter_perf_stats`).

TensorRT-LLM reports per executor iteration: active and queued requests and kvCacheStats (max,
free, used, reused and missed blocks, tokens per block, hit rate). A background task
(`poll_stats`) reads them and keeps the latest in a `StatsCache`; `load()` answers from the cache
at once, so a load report never waits on the GPU process.

Iterations run only while there is work, so stats go quiet when the engine is idle. Quiet stats
with nothing in flight here mean idle (this engine is the LLM's only client); quiet stats with
requests in flight, or no stats yet, are *unknown* - never reported as an idle server.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..engine.base import EngineLoad

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StatsSnapshot:
    at: float  # time.monotonic() when read
    active: int
    queued: int
    kv_used: int
    kv_total: int
    tokens_per_block: int
    reused_blocks: int
    hit_rate: float


def _int(d: Mapping[str, Any], key: str) -> int:
    v = d.get(key, 0)
    return int(v) if isinstance(v, int | float) and math.isfinite(v) and v >= 0 else 0


def parse_stats(raw: Any, now: float) -> StatsSnapshot | None:
    """One iteration's stats (a dict, or its JSON text in some versions); None if unreadable."""
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None
    if not isinstance(raw, Mapping):
        return None
    kv = raw.get("kvCacheStats")
    kv = kv if isinstance(kv, Mapping) else {}
    reused, missed = _int(kv, "reusedBlocks"), _int(kv, "missedBlocks")
    rate = kv.get("cacheHitRate")
    if not (isinstance(rate, int | float) and 0.0 <= rate <= 1.0):
        rate = reused / (reused + missed) if reused + missed else 0.0
    total = _int(kv, "maxNumBlocks")
    used = _int(kv, "usedNumBlocks")
    if not used and total and "freeNumBlocks" in kv:
        used = max(0, total - _int(kv, "freeNumBlocks"))
    return StatsSnapshot(at=now, active=_int(raw, "numActiveRequests"), queued=_int(raw, "numQueuedRequests"),
                         kv_used=used, kv_total=total, tokens_per_block=_int(kv, "tokensPerBlock"),
                         reused_blocks=reused, hit_rate=float(rate))


class StatsCache:
    """The latest snapshot and what this engine itself knows (requests in flight)."""

    def __init__(self, max_running: int, stale_after_s: float) -> None:
        self.max_running = max_running
        self.stale_after_s = stale_after_s
        self.latest: StatsSnapshot | None = None
        self._hit_tokens_total = 0

    def update(self, raw: Any, now: float | None = None) -> bool:
        snap = parse_stats(raw, time.monotonic() if now is None else now)
        if snap is None:
            return False
        self.latest = snap
        # Monotonic even if a restarted executor starts counting again.
        self._hit_tokens_total = max(self._hit_tokens_total, snap.reused_blocks * snap.tokens_per_block)
        return True

    def load(self, inflight: int, tokens_per_second: float, now: float | None = None) -> EngineLoad:
        now = time.monotonic() if now is None else now
        s = self.latest
        own_running = min(inflight, self.max_running)
        own_queued = max(0, inflight - self.max_running)
        if s is None:
            return self._load(own_queued, own_running, None, tokens_per_second, unknown=True)
        fresh = now - s.at <= self.stale_after_s
        if not fresh and inflight > 0:
            return self._load(own_queued, own_running, s, tokens_per_second, unknown=True)
        if not fresh:  # quiet and nothing in flight: idle, with the KV figures last seen
            return self._load(0, 0, s, tokens_per_second)
        # Requests submitted here but not yet in the executor's own queue count as queued.
        return self._load(max(s.queued, inflight - s.active), s.active, s, tokens_per_second)

    def _load(self, queued: int, running: int, s: StatsSnapshot | None, tps: float,
              unknown: bool = False) -> EngineLoad:
        return EngineLoad(queue_depth=queued, running=running, kv_blocks_used=s.kv_used if s else 0,
                          kv_blocks_total=s.kv_total if s else 0, max_running=self.max_running,
                          prefix_cache_hit_rate=s.hit_rate if s else 0.0, tokens_per_second=tps,
                          prefix_cache_hit_tokens_total=self._hit_tokens_total, unknown=unknown)


async def poll_stats(source: Callable[[], Any], cache: StatsCache, idle_s: float = 0.2) -> None:
    """Read iteration stats for ever: `source()` returns one get_stats_async iterator, which ends
    when no stats arrived within its timeout; then read again. Errors are logged once per run of
    failures and retried with backoff; cancelling the task stops it."""
    backoff = idle_s
    failing = False
    while True:
        try:
            async for raw in source():
                cache.update(raw)
            backoff, failing = idle_s, False
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - stats are best effort; load reports say unknown
            if not failing:
                log.warning("tensorrt_llm stats unavailable (%s); load reports fall back to unknown", e)
            failing = True
            backoff = min(backoff * 2, 5.0)
        await asyncio.sleep(backoff)
