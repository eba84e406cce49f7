"""Coexistence: interactive time to first token with and without a batch filling idle capacity
(torch engine, SmolLM2, 2 model servers, 1 router, 1 job worker).

Interactive load is open loop (Poisson arrivals at a fixed mean rate, latency counted from the
scheduled send time) of short chat requests streamed through Envoy. Rounds of two windows: A (no
batch), then B (a fresh batch running, cancelled after the window); the ratio compares the TTFT
p99 of all B samples with that of all A samples. The spread between A windows (worst p99 / best)
is reported too: it is what the shared machine's drift alone does to the figure.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2, jobs_pb2_grpc

from services.localmesh.mesh import LocalMesh

from .common import batch_file, check_not_halted, download, get_batch, loadavg, pct, progress, upload, wait_batch

MODEL = "smollm2"
QUESTIONS = ["What is the capital of France?", "Name a primary colour.", "What is 2 + 2?",
             "Say hello in Spanish.", "What is the largest planet?", "Give a synonym of quick."]


async def _interactive(endpoint: str, rate: float, seconds: float, seed: int) -> tuple[list[float], int]:
    rng = random.Random(seed)
    ttfts: list[float] = []
    failed = 0
    async with grpc.aio.insecure_channel(endpoint) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def one(scheduled: float, text: str) -> None:
            nonlocal failed
            req = inference_pb2.GenerateRequest(model=MODEL)
            req.messages.add(role="user", content=text)
            req.sampling.max_tokens = 8
            try:
                async for chunk in stub.GenerateStream(req, timeout=120):
                    if chunk.token_ids:
                        ttfts.append(time.perf_counter() - scheduled)
                        break
            except grpc.aio.AioRpcError:
                failed += 1

        tasks = []
        start = t = time.perf_counter()
        while t - start < seconds:
            t += rng.expovariate(rate)
            delay = t - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(t, rng.choice(QUESTIONS))))
        await asyncio.gather(*tasks)
    return ttfts, failed


_ENDED = (jobs_pb2.BATCH_STATUS_CANCELLED, jobs_pb2.BATCH_STATUS_COMPLETED, jobs_pb2.BATCH_STATUS_FAILED,
          jobs_pb2.BATCH_STATUS_EXPIRED)


def _window(mesh: LocalMesh, label: str, rate: float, seconds: float, seed: int) -> dict:
    load = loadavg()
    ttfts, failed = asyncio.run(_interactive(mesh.envoy, rate, seconds, seed))
    out = {"requests": len(ttfts) + failed, "failed": failed, "ttft_p50_s": round(pct(ttfts, 50), 3),
           "ttft_p99_s": round(pct(ttfts, 99), 3), "loadavg_start": load, "loadavg_end": loadavg(),
           "ttfts": [round(x, 4) for x in ttfts]}
    if failed:
        check_not_halted(mesh, MODEL)  # failures from a halted model are not a latency figure
    progress(f"coexist {label}: {len(ttfts)} ok, {failed} failed, TTFT p50 {out['ttft_p50_s']} s, "
             f"p99 {out['ttft_p99_s']} s")
    return out


def _batch_window(mesh: LocalMesh, stub: jobs_pb2_grpc.JobServiceStub, label: str, rate: float, seconds: float,
                  seed: int, batch_lines: int) -> tuple[dict, dict]:
    """One B window: a fresh batch fills idle capacity while interactive traffic runs, then is cancelled."""
    system = "You are a careful assistant. Answer in two or three sentences."
    data = batch_file(batch_lines, MODEL, 48, lambda i: f"Tell me something interesting about the number {i}.",
                      system=system)
    batch = stub.CreateBatch(jobs_pb2.CreateBatchRequest(input_file_id=upload(stub, data).file_id), timeout=30).batch
    b = wait_batch(stub, batch.batch_id, lambda x: x.status != jobs_pb2.BATCH_STATUS_VALIDATING, mesh, MODEL, 300)
    time.sleep(5)  # the workers fill the idle slots first
    before = get_batch(stub, batch.batch_id) or b
    t0 = time.monotonic()
    win = _window(mesh, label, rate, seconds, seed)
    after = get_batch(stub, batch.batch_id) or before
    elapsed = time.monotonic() - t0
    try:
        stub.CancelBatch(jobs_pb2.CancelBatchRequest(batch_id=batch.batch_id), timeout=30)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # it completed first: fine
            raise
    end = wait_batch(stub, batch.batch_id, lambda x: x.status in _ENDED, mesh, MODEL, 300)
    tokens = sum(o["response"]["body"]["usage"].get("completion_tokens", 0)
                 for o in download(stub, end.output_file_id))
    lifetime = ((end.cancelling_at_ms or end.finalizing_at_ms) - end.in_progress_at_ms) / 1000
    lines = after.request_counts.completed - before.request_counts.completed
    return win, {"lines_in_window": lines, "window_s": elapsed, "tokens": tokens, "running_s": lifetime}


def run(mesh: LocalMesh, rate: float, seconds: float, batch_lines: int, rounds: int) -> dict:
    """Rounds of A (no batch) then B (a batch running): drift of a shared machine over the run
    falls on both sides alike, and the pooled samples make p99 more than the single worst one."""
    stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(mesh.envoy))
    _window(mesh, "warm-up", rate, min(10.0, seconds), 99)
    windows: dict[str, dict] = {}
    batches: list[dict] = []
    for r in range(1, rounds + 1):
        windows[f"A{r}"] = _window(mesh, f"A{r} (no batch)", rate, seconds, 10 * r + 1)
        windows[f"B{r}"], stats = _batch_window(mesh, stub, f"B{r} (batch running)", rate, seconds, 10 * r + 2,
                                                batch_lines)
        batches.append(stats)
    a_ttfts = [t for k, w in windows.items() if k.startswith("A") for t in w["ttfts"]]
    b_ttfts = [t for k, w in windows.items() if k.startswith("B") for t in w["ttfts"]]
    a99, b99 = pct(a_ttfts, 99), pct(b_ttfts, 99)
    a_p99s = [w["ttft_p99_s"] for k, w in windows.items() if k.startswith("A")]
    tokens, running = sum(b["tokens"] for b in batches), sum(b["running_s"] for b in batches)
    lines, in_windows = sum(b["lines_in_window"] for b in batches), sum(b["window_s"] for b in batches)
    return {
        "engine": "torch smollm2 (threads=1), 2 servers", "rate_per_s": rate, "window_s": seconds, "rounds": rounds,
        "baseline_ttft_p99_s": round(a99, 3), "batch_ttft_p99_s": round(b99, 3),
        "baseline_ttft_p50_s": round(pct(a_ttfts, 50), 3), "batch_ttft_p50_s": round(pct(b_ttfts, 50), 3),
        "interactive_ttft_p99_ratio": round(b99 / a99, 3) if a99 else None,
        "a_to_a_p99_ratio": round(max(a_p99s) / min(a_p99s), 3) if min(a_p99s) > 0 else None,
        "batch_lines_done_in_window": lines, "batch_lines_per_s": round(lines / in_windows, 3),
        "batch_tokens_per_s": round(tokens / running, 1) if running > 0 else None,
        "batch_tokens_total": tokens, "batch_running_s": round(running, 1),
        "windows": {k: _strip(w) for k, w in windows.items()},
    }


def _strip(window: dict) -> dict:
    return {k: v for k, v in window.items() if k != "ttfts"}
