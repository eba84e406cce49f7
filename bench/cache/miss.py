"""The shared tier's cost when it misses: fresh prompts on one engine, tier attached vs detached.

Each round runs two fresh prompts back to back with the tier attached (every look-up misses, every
block is written; the second prompt's prefill overlaps the first's writes) and two detached, in
alternating order; the writer is settled at each switch, so one mode's writes never land in the
other's TTFT. Three figures, because TTFT on a shared, loaded 2-core machine is noisy:

- `overhead`: TTFT p50 attached / detached - 1 (the issue's figure);
- `paired_overhead`: the median over rounds of the same ratio within a round (neighbours in time
  see the same machine load);
- `cpu_overhead`: the CPU the tier's own work takes per attached request (its offer on the step
  thread, its writer and look-up threads, and redis-server) over a detached request's CPU: what
  the tier costs the machine, whatever else runs on it. (The whole process's CPU, also recorded,
  moves with load too: OpenMP threads spin longer at barriers when other processes preempt them.)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from pathlib import Path
from typing import Any

from services.cache.kv_tier import KvTier
from services.modelserver.torch_engine import TorchEngine

from .common import text_of
from .engines import Detached, ttft


def cpu_seconds(pid: int) -> float:
    """User + system CPU a process has used (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def settle(engine: TorchEngine, timeout_s: float = 60.0) -> None:
    """Wait until the tier's writer has written (or dropped) everything offered."""
    tier = engine.cache.tier if engine.cache is not None else None
    if tier is not None:
        await asyncio.to_thread(tier.wait_writes, timeout_s)


async def _block(engine: TorchEngine, tier: KvTier, prompts: list[str],
                 redis_pid: int) -> tuple[list[float], float, float]:
    """Fresh prompts back to back (a prompt's prefill overlaps the writes of the one before), then
    the writes settled: (TTFTs, CPU per prompt of this process and redis-server, CPU per prompt
    of the tier's own work: its offer, writer and look-up paths plus redis-server)."""
    c0, r0, t0 = time.process_time(), cpu_seconds(redis_pid), sum(tier.cpu_s.values())
    firsts = [float((await ttft(engine, p, max_tokens=2))["ttft_s"]) for p in prompts]
    await asyncio.to_thread(tier.wait_writes, 60.0)
    redis = cpu_seconds(redis_pid) - r0
    n = len(prompts)
    return firsts, (time.process_time() - c0 + redis) / n, (sum(tier.cpu_s.values()) - t0 + redis) / n


async def _round(engine: TorchEngine, tier: KvTier, i: int, redis_pid: int, out: dict[str, list[float]]) -> float:
    """Two fresh prompts per mode, modes in alternating order; returns the round's attached/detached
    TTFT ratio."""
    means = {}
    for attached in ((True, False) if i % 2 == 0 else (False, True)):
        mode = "on" if attached else "off"
        prompts = [text_of(380, seed=1000 + 4 * i + 2 * int(attached) + j) for j in range(2)]  # never cached
        if attached:
            firsts, cpu, tier_cpu = await _block(engine, tier, prompts, redis_pid)
        else:
            with Detached(engine):
                firsts, cpu, tier_cpu = await _block(engine, tier, prompts, redis_pid)
        out[f"ttft_{mode}_s"] += firsts
        out[f"cpu_{mode}_s"].append(cpu)
        out[f"tier_cpu_{mode}_s"].append(tier_cpu)
        means[mode] = statistics.fmean(firsts)
    return means["on"] / means["off"]


async def miss_cost(engine: TorchEngine, rounds: int, redis_pid: int) -> dict[str, Any]:
    assert engine.cache is not None and engine.cache.tier is not None, "the miss phase needs a shared tier"
    tier = engine.cache.tier
    out: dict[str, list[float]] = {f"{what}_{mode}_s": [] for what in ("ttft", "cpu", "tier_cpu")
                                   for mode in ("on", "off")}
    load = [os.getloadavg()[0]]
    ratios = []
    for i in range(rounds):
        ratios.append(await _round(engine, tier, i, redis_pid, out))
        load.append(os.getloadavg()[0])
    p50_on, p50_off = statistics.median(out["ttft_on_s"]), statistics.median(out["ttft_off_s"])
    cpu_on, cpu_off = statistics.median(out["cpu_on_s"]), statistics.median(out["cpu_off_s"])
    return {**out, "p50_on_s": p50_on, "p50_off_s": p50_off, "overhead": p50_on / p50_off - 1,
            "round_ratios": ratios, "paired_overhead": statistics.median(ratios) - 1,
            "cpu_on_s_median": cpu_on, "cpu_off_s_median": cpu_off, "process_cpu_overhead": cpu_on / cpu_off - 1,
            "cpu_overhead": statistics.median(out["tier_cpu_on_s"]) / cpu_off,
            "loadavg_1m": load}
