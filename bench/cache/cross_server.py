"""Phase `cross_server`: two torch engines (two servers' worth) sharing one store, in-process.

- Cross-server reuse: a ~1,500-token prefix computed on A, then asked on B (its own pool empty):
  TTFT fetching from the shared tier against B recomputing it (tier detached), greedy ids compared;
  and B's own pool hit (what a host-RAM tier would add on a CPU engine, whose pool is host RAM).
- Miss cost: TTFT p50 on fresh prompts with the tier attached (every look-up misses, every block
  is written) against the tier detached, interleaved.
- Cross-tenant hits: one tenant's prefix in the store and in A's pool, other tenants interleaved on
  both engines: hits must be 0.
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from services.cache import metrics, runtime
from services.modelserver.engine.base import GenerationRequest, SamplingParams
from services.modelserver.torch_engine import TorchEngine, TorchEngineConfig

from .common import RedisProcess, percentile, text_of

log = logging.getLogger(__name__)
MODEL = "smollm2"


def _config() -> TorchEngineConfig:
    return TorchEngineConfig(threads=2, kv_cache_blocks=96, max_running=8, step_token_budget=512,
                             max_context=2048, warmup=True)


async def _ttft(engine: TorchEngine, prompt: str, tenant: str = "bench", max_tokens: int = 8) -> dict[str, Any]:
    req = GenerationRequest(request_id="bench", model=MODEL, prompt=prompt, tenant=tenant,
                            sampling=SamplingParams(max_tokens=max_tokens))
    started = time.monotonic()
    first = None
    ids: list[int] = []
    cached = 0
    async for chunk in engine.generate(req):
        if first is None and chunk.token_ids:
            first = time.monotonic() - started
        ids += chunk.token_ids
        if chunk.usage is not None:
            cached, prompt_tokens = chunk.usage.cached_tokens, chunk.usage.prompt_tokens
    return {"ttft_s": first, "ids": ids, "cached_tokens": cached, "prompt_tokens": prompt_tokens}


class _Detached:
    """The engine without its shared tier (as if the server had no store), for baselines."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine

    def __enter__(self) -> None:
        assert self.engine.core is not None and self.engine.cache is not None
        self.tier = self.engine.cache.tier
        self.engine.core.tier = self.engine.cache.tier = None

    def __exit__(self, *exc: object) -> None:
        assert self.engine.core is not None and self.engine.cache is not None
        self.engine.core.tier = self.engine.cache.tier = self.tier


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
    trials, pairs = (1, 2) if quick else (3, 6)
    with RedisProcess(tmp / "redis", 1 << 30) as store:
        runtime.configure(store.url, secret="bench")
        a, b = TorchEngine(MODEL, "embedded", _config()), TorchEngine(MODEL, "embedded", _config())
        await a.start()
        await b.start()
        try:
            reuse = await _reuse(a, b, trials)
            miss = await _miss_cost(b, pairs)
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
        computed = await _ttft(a, prefix)
        n_blocks = (computed["prompt_tokens"] - 1) // 64
        await _wait_written(a, (t + 1) * n_blocks)
        await _flush_local(b)
        with _Detached(b):
            recompute = await _ttft(b, prefix)
        await _flush_local(b)
        shared = await _ttft(b, prefix)
        local = await _ttft(b, prefix)
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


async def _miss_cost(b: TorchEngine, pairs: int) -> dict[str, Any]:
    on: list[float] = []
    off: list[float] = []
    for i in range(pairs):
        for attached in ((True, False) if i % 2 == 0 else (False, True)):
            prompt = text_of(380, seed=1000 + 2 * i + int(attached))  # fresh: never cached anywhere
            if attached:
                on.append((await _ttft(b, prompt, max_tokens=2))["ttft_s"])
            else:
                with _Detached(b):
                    off.append((await _ttft(b, prompt, max_tokens=2))["ttft_s"])
    p50_on, p50_off = percentile(on, 50), percentile(off, 50)
    return {"ttft_on_s": on, "ttft_off_s": off, "p50_on_s": p50_on, "p50_off_s": p50_off,
            "overhead": p50_on / p50_off - 1}


async def _cross_tenant(a: TorchEngine, b: TorchEngine) -> dict[str, Any]:
    """tenant-0's prefix is in the store and in A's pool; eight other tenants ask for it once each,
    alternating engines, with tenant-0 asking again in between: any hit would be another tenant's."""
    prefix = text_of(400, seed=7)
    owner = await _ttft(a, prefix, tenant="tenant-0")
    await _wait_written(a, 1)
    hits = 0
    for i in range(1, 9):
        got = await _ttft(a if i % 2 else b, prefix, tenant=f"tenant-{i}")
        hits += int(got["cached_tokens"] > 0)
        await _ttft(b if i % 2 else a, prefix, tenant="tenant-0")
    same = await _ttft(b, prefix, tenant="tenant-0")
    return {"cross_tenant_requests": 8, "cross_tenant_hits": hits,
            "same_tenant_cached_tokens": same["cached_tokens"], "prompt_tokens": owner["prompt_tokens"]}
