"""Phase `cross_server`: two torch engines (two servers' worth) sharing one store, in-process.

- Cross-server reuse: a ~1,500-token prefix computed on A, then asked on B (its own pool empty):
  TTFT fetching from the shared tier against B recomputing it (tier detached), greedy ids compared;
  and B's own pool hit (what a host-RAM tier would add on a CPU engine, whose pool is host RAM).
- Miss cost (bench/cache/miss.py): fresh prompts with the tier attached (every look-up misses,
  every block is written) against the tier detached, interleaved; TTFT and CPU.
- Cross-tenant hits: one tenant's prefix in the store and in A's pool, other tenants interleaved on
  both engines: hits must be 0.
"""

from __future__ import annotations

import logging
import statistics
from pathlib import Path
from typing import Any

import torch

from services.cache import metrics, runtime
from services.modelserver.torch_engine import TorchEngine

from .common import RedisProcess, text_of
from .engines import MODEL, Detached, config, ttft
from .miss import miss_cost

log = logging.getLogger(__name__)
async def _flush_local(engine: TorchEngine) -> None:
    assert engine.cache is not None
    await engine.on_core_thread(engine.cache.flush_local)


async def _wait_written(engine: TorchEngine, n: int) -> None:
    import asyncio
    assert engine.cache is not None
    for _ in range(300):
        if engine.cache.events.sizes()[1] >= n:
            return
        await asyncio.sleep(0.1)


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    torch.set_num_threads(2)
    trials, rounds = (1, 2) if quick else (3, 5)
    with RedisProcess(tmp / "redis", 1 << 30) as store:
        runtime.configure(store.url, secret="bench")
        a, b = TorchEngine(MODEL, "embedded", config()), TorchEngine(MODEL, "embedded", config())
        await a.start()
        await b.start()
        try:
            reuse = await _reuse(a, b, trials)
            assert store.proc is not None
            miss = await miss_cost(b, rounds, store.proc.pid)
            tenants = await _cross_tenant(a, b)
        finally:
            await a.stop()
            await b.stop()
            runtime.configure("")
    return {"reuse": reuse, "miss": miss, "tenants": tenants, "dtype": str(a.dtype)}


async def _reuse(a: TorchEngine, b: TorchEngine, trials: int) -> dict[str, Any]:
    rows = []
    for t in range(trials):
        prefix = text_of(1400, seed=100 + t)
        computed = await ttft(a, prefix)
        n_blocks = (computed["prompt_tokens"] - 1) // 64
        await _wait_written(a, (t + 1) * n_blocks)
        await _flush_local(b)
        with Detached(b):
            recompute = await ttft(b, prefix)
        await _flush_local(b)
        shared = await ttft(b, prefix)
        local = await ttft(b, prefix)
        rows.append({"prompt_tokens": computed["prompt_tokens"], "compute_on_a_s": computed["ttft_s"],
                     "recompute_on_b_s": recompute["ttft_s"], "shared_on_b_s": shared["ttft_s"],
                     "local_hit_on_b_s": local["ttft_s"], "shared_cached_tokens": shared["cached_tokens"],
                     "identical": shared["ids"] == recompute["ids"] == computed["ids"]})
        log.info("reuse trial %d: %s", t, rows[-1])
    rec = statistics.median(r["recompute_on_b_s"] for r in rows)
    sh = statistics.median(r["shared_on_b_s"] for r in rows)
    loc = statistics.median(r["local_hit_on_b_s"] for r in rows)
    fetch = metrics.tier_stats(MODEL, "shared")
    return {"trials": rows, "recompute_ttft_s": rec, "shared_ttft_s": sh, "local_hit_ttft_s": loc,
            "speedup": rec / sh, "identical": all(r["identical"] for r in rows),
            "shared_bytes_read": fetch.bytes_read, "shared_bytes_written": fetch.bytes_written}


async def _cross_tenant(a: TorchEngine, b: TorchEngine) -> dict[str, Any]:
    """tenant-0's prefix is in the store and in A's pool; eight other tenants ask for it once each,
    alternating engines, with tenant-0 asking again in between: any hit would be another tenant's."""
    prefix = text_of(400, seed=7)
    owner = await ttft(a, prefix, tenant="tenant-0")
    await _wait_written(a, 1)
    hits = 0
    for i in range(1, 9):
        got = await ttft(a if i % 2 else b, prefix, tenant=f"tenant-{i}")
        hits += int(got["cached_tokens"] > 0)
        await ttft(b if i % 2 else a, prefix, tenant="tenant-0")
    same = await ttft(b, prefix, tenant="tenant-0")
    return {"cross_tenant_requests": 8, "cross_tenant_hits": hits,
            "same_tenant_cached_tokens": same["cached_tokens"], "prompt_tokens": owner["prompt_tokens"]}
