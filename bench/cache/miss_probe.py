"""Where the shared tier's miss cost goes: python -m bench.cache.miss_probe [--rounds N] [--words W].

One torch engine and one redis-server, as in `make bench-cache`'s miss phase. Each round runs three
fresh prompts in rotating order: tier detached (`off`), attached with writes (`on`), attached with
writes refused (`read_only`: the look-up alone). Reports TTFT p50 per mode, time spent in the tier's
read and write paths, and the CPU the engine process and redis-server used, so a regression is
pinned on the look-up, the writes or the machine's load rather than guessed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from services.cache import runtime
from services.cache.kv_tier import KvTier
from services.modelserver.torch_engine import TorchEngine

from .common import RedisProcess, text_of
from .engines import MODEL, Detached, config, ttft
from .miss import cpu_seconds, settle

MODES = ("off", "on", "read_only")


def _timed(spent: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[name + " wall"] += time.perf_counter() - t0
            spent[name + " cpu"] += time.thread_time() - c0
    return wrapper


def _instrument(tier: KvTier, spent: dict[str, float]) -> None:
    tier.fetch = _timed(spent, "fetch (reader thread)", tier.fetch)  # type: ignore[method-assign]
    tier.offer = _timed(spent, "offer (step thread)", tier.offer)  # type: ignore[method-assign]
    encode = tier._encode  # noqa: SLF001 - instrumentation
    tier._encode = _timed(spent, "encode (writer thread)", encode)  # type: ignore[method-assign]  # noqa: SLF001
    tier.store.set_many = _timed(spent, "set_many (writer thread)", tier.store.set_many)  # type: ignore[method-assign]


async def _one(engine: TorchEngine, tier: KvTier, mode: str, prompt: str) -> float:
    if mode == "off":
        with Detached(engine):
            return float((await ttft(engine, prompt, max_tokens=2))["ttft_s"])
    if mode == "read_only":
        offer = tier.offer
        tier.offer = lambda refs: []  # type: ignore[method-assign]
        try:
            return float((await ttft(engine, prompt, max_tokens=2))["ttft_s"])
        finally:
            tier.offer = offer  # type: ignore[method-assign]
    return float((await ttft(engine, prompt, max_tokens=2))["ttft_s"])


async def probe(rounds: int, words: int, settle_writes: bool) -> dict[str, Any]:
    torch.set_num_threads(2)
    spent: dict[str, float] = defaultdict(float)
    ttft: dict[str, list[float]] = {m: [] for m in MODES}
    cpu: dict[str, list[float]] = {m: [] for m in MODES}
    with tempfile.TemporaryDirectory(prefix="miss-probe-") as tmp, RedisProcess(Path(tmp), 1 << 30) as redis:
        runtime.configure(redis.url, secret="probe")
        engine = TorchEngine(MODEL, "embedded", config())
        await engine.start()
        try:
            assert engine.cache is not None and engine.cache.tier is not None
            tier = engine.cache.tier
            _instrument(tier, spent)
            assert redis.proc is not None
            t0 = time.monotonic()
            for r in range(rounds):
                for j in range(len(MODES)):
                    mode = MODES[(r + j) % len(MODES)]
                    c0, rc0 = time.process_time(), cpu_seconds(redis.proc.pid)
                    ttft[mode].append(await _one(engine, tier, mode, text_of(words, seed=5000 + 10 * r + j)))
                    if settle_writes:
                        await settle(engine)
                    cpu[mode].append(time.process_time() - c0 + cpu_seconds(redis.proc.pid) - rc0)
            wall = time.monotonic() - t0
        finally:
            await engine.stop()
            runtime.configure("")
    p50 = {m: statistics.median(v) for m, v in ttft.items()}
    return {"rounds": rounds, "words": words, "settle": settle_writes, "loadavg": os.getloadavg(),
            "ttft_s": ttft, "p50_s": p50, "overhead_on": p50["on"] / p50["off"] - 1,
            "overhead_read_only": p50["read_only"] / p50["off"] - 1, "tier_seconds": dict(spent),
            "cpu_s (engine + redis, per request)": cpu,
            "cpu_overhead_on": statistics.median(cpu["on"]) / statistics.median(cpu["off"]) - 1, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--words", type=int, default=380)
    parser.add_argument("--settle", action="store_true", help="wait for queued writes between requests")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(json.dumps(asyncio.run(probe(args.rounds, args.words, args.settle)), indent=1, default=str))


if __name__ == "__main__":
    main()
