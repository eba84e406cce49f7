"""Where the coexistence cost comes from on a CPU host: interactive TTFT of one torch engine
(SmolLM2, threads=1), with no background work, with background (SHEDDABLE) generations on the
SAME engine, and with the same background work on ANOTHER engine process of the same host.

The first shows what the engine's scheduling costs an interactive request (background sits out
its prompt steps); the second what two model servers that share CPU cores cost each other, which
no scheduling inside a server can remove. The three conditions alternate over rounds.
`python -m bench.asyncjobs.interference` writes bench/results/async-interference.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

from services.common.validation import ChatMessage
from services.modelserver.engine.base import GenerationRequest, Priority, SamplingParams
from services.modelserver.torch_engine.config import TorchEngineConfig
from services.modelserver.torch_engine.engine import TorchEngine

from .common import loadavg, pct, progress

RESULTS = Path(__file__).resolve().parents[1] / "results"
SYSTEM = "You are a careful assistant. Answer in two or three sentences."
BACKGROUND_STREAMS = 2  # what one server carries in the coexistence part (4 in flight, 2 servers)


async def _one(engine: TorchEngine, rid: str, priority: Priority, max_tokens: int,
               messages: list[ChatMessage]) -> float:
    req = GenerationRequest(request_id=rid, model="m", messages=messages,
                            sampling=SamplingParams(max_tokens=max_tokens), priority=priority)
    t0 = time.perf_counter()
    first: float | None = None
    async for chunk in engine.generate(req):
        if first is None and chunk.token_ids:
            first = time.perf_counter() - t0
    if first is None:
        raise RuntimeError(f"{rid}: no token came back")
    return first


async def _background(engine: TorchEngine, stop: asyncio.Event, stream: int) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        await _one(engine, f"bg{stream}-{i}", Priority.SHEDDABLE, 48,
                   [ChatMessage("system", SYSTEM), ChatMessage("user", f"Tell me something about the number {i}.")])


async def _measure(engine: TorchEngine, label: str, n: int) -> dict:
    load = loadavg()
    ttfts = []
    for i in range(n):
        ttfts.append(await _one(engine, f"{label}-{i}", Priority.STANDARD, 8,
                                [ChatMessage("user", "What is the capital of France?")]))
        await asyncio.sleep(0.3)
    out = {"requests": n, "ttft_p50_s": round(pct(ttfts, 50), 3), "ttft_max_s": round(max(ttfts), 3),
           "loadavg_start": load}
    progress(f"interference {label}: {out}")
    return out


async def _engine() -> TorchEngine:
    engine = TorchEngine("m", "embedded", TorchEngineConfig(threads=1))
    await engine.start()
    return engine


async def _hog() -> None:
    """The other server: an engine that runs background generations while stdin says "on"."""
    engine = await _engine()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    stop: asyncio.Event | None = None
    tasks: list[asyncio.Task] = []
    while line := (await loop.run_in_executor(None, sys.stdin.readline)).strip():
        if line == "on" and stop is None:
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_background(engine, stop, s)) for s in range(BACKGROUND_STREAMS)]
        elif line == "off" and stop is not None:
            stop.set()
            await asyncio.gather(*tasks)
            stop = None
        print(line, flush=True)
    await engine.stop()


async def _run(n: int, rounds: int) -> dict:
    """Rounds of: alone, background on the same engine, background on the other process; the
    conditions alternate so a shared machine's drift falls on all three alike."""
    engine = await _engine()
    hog = await asyncio.create_subprocess_exec(sys.executable, "-m", "bench.asyncjobs.interference", "--hog",
                                               stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert hog.stdin is not None and hog.stdout is not None
    stdin, stdout = hog.stdin, hog.stdout

    async def tell(word: str) -> None:
        stdin.write(f"{word}\n".encode())
        await stdin.drain()
        while (await stdout.readline()).decode().strip() != word:
            pass

    await stdout.readline()  # "ready": its model is loaded
    out: dict = {}
    try:
        for r in range(1, rounds + 1):
            out[f"alone-{r}"] = await _measure(engine, f"alone-{r}", n)
            stop = asyncio.Event()
            tasks = [asyncio.create_task(_background(engine, stop, s)) for s in range(BACKGROUND_STREAMS)]
            await asyncio.sleep(2)
            out[f"same-engine-{r}"] = await _measure(engine, f"same-engine-{r}", n)
            stop.set()
            await asyncio.gather(*tasks)
            await tell("on")
            await asyncio.sleep(2)
            out[f"other-process-{r}"] = await _measure(engine, f"other-process-{r}", n)
            await tell("off")
    finally:
        stdin.close()
        await asyncio.wait_for(hog.wait(), 120)
        await engine.stop()
    return out


def _pooled(out: dict) -> dict:
    return {cond: round(sum(v["ttft_p50_s"] for k, v in out.items() if k.startswith(cond))
                        / sum(1 for k in out if k.startswith(cond)), 3)
            for cond in ("alone", "same-engine", "other-process")}


def _markdown(out: dict) -> str:
    rows = [f"| {k} | {v['requests']} | {v['ttft_p50_s']} | {v['ttft_max_s']} | {v['loadavg_start']} |"
            for k, v in out["windows"].items()]
    return "\n".join([
        "# Coexistence on a CPU host: where interactive TTFT goes (issue 11)", "",
        f"Run {out['started']}; {out['machine']['cpus']} CPUs, load average {out['machine']['loadavg_before']} "
        f"before, {out['machine']['loadavg_after']} after (shared machine). One torch engine (SmolLM2, "
        f"threads=1) answers short chat requests one at a time; background = {BACKGROUND_STREAMS} SHEDDABLE "
        "generations of 48 tokens kept running, on the same engine or on another engine process.", "",
        "| window | requests | TTFT p50 s | TTFT max s | load average |", "|---|---|---|---|---|", *rows, "",
        f"Mean of the windows' TTFT p50 per condition: {out['p50_mean_s']}.", ""])


def main() -> None:
    p = argparse.ArgumentParser(prog="bench-async-interference")
    p.add_argument("--requests", type=int, default=12, help="per window")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--hog", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hog:
        asyncio.run(_hog())
        return
    out: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_before": loadavg()},
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    out["windows"] = asyncio.run(_run(args.requests, args.rounds))
    out["p50_mean_s"] = _pooled(out["windows"])
    out["machine"]["loadavg_after"] = loadavg()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "async-interference.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / "async-interference.md").write_text(_markdown(out))
    progress(f"wrote {RESULTS}/async-interference.json and .md")


if __name__ == "__main__":
    main()
