"""Coexistence: interactive time to first token with and without a batch filling idle capacity
(torch engine, SmolLM2, 2 model servers, 1 router, 1 job worker).

Interactive load is open loop (Poisson arrivals at a fixed mean rate, latency counted from the
scheduled send time) of short chat requests streamed through Envoy. Windows: A (no batch), B (a
batch running), A again; the ratio compares B's TTFT p99 with the p99 of both A windows together,
so drift of a shared machine over the run shows up in the A-to-A spread that is reported too.
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


def run(mesh: LocalMesh, rate: float, seconds: float, batch_lines: int) -> dict:
    stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(mesh.envoy))
    _window(mesh, "warm-up", rate, min(10.0, seconds), 99)
    a1 = _window(mesh, "A (no batch)", rate, seconds, 1)
    system = "You are a careful assistant. Answer in two or three sentences."
    data = batch_file(batch_lines, MODEL, 48, lambda i: f"Tell me something interesting about the number {i}.",
                      system=system)
    batch = stub.CreateBatch(jobs_pb2.CreateBatchRequest(input_file_id=upload(stub, data).file_id), timeout=30).batch
    b = wait_batch(stub, batch.batch_id, lambda x: x.status != jobs_pb2.BATCH_STATUS_VALIDATING, mesh, MODEL, 300)
    time.sleep(5)  # the workers fill the idle slots first
    before = get_batch(stub, batch.batch_id) or b
    t0 = time.monotonic()
    b_win = _window(mesh, "B (batch running)", rate, seconds, 2)
    after = get_batch(stub, batch.batch_id) or before
    elapsed = time.monotonic() - t0
    lines_done = after.request_counts.completed - before.request_counts.completed
    try:
        stub.CancelBatch(jobs_pb2.CancelBatchRequest(batch_id=batch.batch_id), timeout=30)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.FAILED_PRECONDITION:  # it completed first: fine
            raise
    end = wait_batch(stub, batch.batch_id, lambda x: x.status in _ENDED, mesh, MODEL, 300)
    tokens = sum(o["response"]["body"]["usage"].get("completion_tokens", 0)
                 for o in download(stub, end.output_file_id))
    lifetime = ((end.cancelling_at_ms or end.finalizing_at_ms) - end.in_progress_at_ms) / 1000
    a2 = _window(mesh, "A again (batch cancelled)", rate, seconds, 3)
    baseline = pct(a1["ttfts"] + a2["ttfts"], 99)
    return {
        "engine": "torch smollm2 (threads=1), 2 servers", "rate_per_s": rate, "window_s": seconds,
        "baseline_ttft_p99_s": round(baseline, 3), "batch_ttft_p99_s": b_win["ttft_p99_s"],
        "interactive_ttft_p99_ratio": round(b_win["ttft_p99_s"] / baseline, 3) if baseline else None,
        "a_to_a_p99_ratio": round(a2["ttft_p99_s"] / a1["ttft_p99_s"], 3) if a1["ttft_p99_s"] else None,
        "batch_lines_done_in_window": lines_done, "batch_lines_per_s": round(lines_done / elapsed, 3),
        "batch_tokens_per_s": round(tokens / lifetime, 1) if lifetime > 0 else None,
        "batch_tokens_total": tokens, "batch_running_s": round(lifetime, 1),
        "windows": {"A": _strip(a1), "B": _strip(b_win), "A2": _strip(a2)},
    }


def _strip(window: dict) -> dict:
    return {k: v for k, v in window.items() if k != "ttfts"}
