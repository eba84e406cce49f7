"""The GPU acceptance checks, each against a running mesh through Envoy (gRPC, public API).

Every check returns (ok, detail); run.py prints and records them. They talk to the mesh only as a
client would, so a pass means what a client sees.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import grpc
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

Result = tuple[bool, str]
PROMPT = "Write one long paragraph about the history of bicycles in Europe."


def request(model: str, max_tokens: int, *, stop: tuple[str, ...] = (), logprobs: bool = False,
            priority: common_pb2.Priority = common_pb2.PRIORITY_STANDARD,
            prompt: str = PROMPT) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=model, priority=priority)
    req.messages.add(role="user", content=prompt)
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0.0
    req.sampling.stop.extend(stop)
    req.sampling.logprobs = logprobs
    return req


def stream(stub: Any, req: inference_pb2.GenerateRequest, timeout: float = 120) -> tuple[list[Any], float]:
    """All chunks of one streamed answer and the time to its first token."""
    start = time.monotonic()
    chunks: list[Any] = []
    ttft = float("nan")
    for c in stub.GenerateStream(req, timeout=timeout):
        if c.token_ids and not chunks:
            ttft = time.monotonic() - start
        chunks.append(c)
    return chunks, ttft


def streaming(stub: Any, model: str) -> Result:
    chunks, _ = stream(stub, request(model, 64))
    ids = [t for c in chunks for t in c.token_ids]
    final = chunks[-1]
    ok = len([c for c in chunks if c.token_ids]) > 1 and final.usage.completion_tokens == len(ids) > 0
    return ok, f"{len(chunks)} chunks, {len(ids)} tokens, usage {final.usage.completion_tokens}"


def stop_strings(stub: Any, model: str) -> Result:
    """The reference answer's 5th word as a stop string: the text must end right before it."""
    ref, _ = stream(stub, request(model, 64))
    text = "".join(c.text for c in ref)
    words = text.split()
    if len(words) < 6:
        return False, f"reference answer too short: {text!r}"
    stop = " " + words[4]
    got, _ = stream(stub, request(model, 64, stop=(stop,)))
    got_text = "".join(c.text for c in got)
    ids = [t for c in got for t in c.token_ids]
    ok = (got_text == text[:text.find(stop)] and got[-1].finish_reason == common_pb2.FINISH_REASON_STOP
          and got[-1].usage.completion_tokens == len(ids))
    return ok, f"stop {stop!r}: got {got_text!r}"


def logprobs(stub: Any, model: str) -> Result:
    chunks, _ = stream(stub, request(model, 16, logprobs=True))
    lps = [lp for c in chunks for lp in c.logprobs]
    n = sum(len(c.token_ids) for c in chunks)
    return len(lps) == n and all(lp <= 0.0 for lp in lps), f"{len(lps)} logprobs for {n} tokens"


def cancellation(stub: Any, model: str, running: Callable[[], int]) -> Result:
    call = stub.GenerateStream(request(model, 2000))
    next(iter(call))
    call.cancel()
    end = time.monotonic() + 10
    while running() > 0 and time.monotonic() < end:
        time.sleep(0.05)
    return running() == 0, f"running after cancel: {running()}"


def priority_order(stub: Any, model: str, background: int = 48) -> Result:
    """Saturate the engine with SHEDDABLE work, then send CRITICAL requests: they must start before
    the queued background requests do (the engine's waiting queue ordered by priority)."""
    with cf.ThreadPoolExecutor(background + 4) as pool:
        bg = [pool.submit(stream, stub, request(model, 256, priority=common_pb2.PRIORITY_SHEDDABLE))
              for _ in range(background)]
        time.sleep(1.0)
        crit = [pool.submit(stream, stub, request(model, 8, priority=common_pb2.PRIORITY_CRITICAL)) for _ in range(4)]
        crit_ttft = [f.result()[1] for f in crit]
        bg_ttft = [f.result()[1] for f in bg]
    late_bg = sorted(bg_ttft)[len(bg_ttft) // 2:]  # the half that had to wait
    ok = statistics.median(crit_ttft) < statistics.median(late_bg)
    return ok, (f"critical TTFT median {statistics.median(crit_ttft):.3f}s vs queued sheddable "
                f"{statistics.median(late_bg):.3f}s")


def server_load(controlplane: str, server: str) -> dict[str, Any]:
    """The server's load as `meshctl status -o json` shows it (what an operator sees)."""
    out = subprocess.run([sys.executable, "-m", "services.cli.meshctl", "--controlplane", controlplane,
                          "-o", "json", "status"], capture_output=True, text=True, timeout=30, check=True)
    servers = json.loads(out.stdout).get("servers", [])
    mine = [s for s in servers if s.get("info", {}).get("server_id") == server]
    return dict(mine[0].get("load", {})) if mine else {}


def kv_figures(controlplane: str, server: str) -> Result:
    load = server_load(controlplane, server)
    used, total = int(load.get("kv_blocks_used", 0)), int(load.get("kv_blocks_total", 0))
    return total > 0, f"{server}: kv {used}/{total} blocks in meshctl status"


def throughput(stub: Any, model: str, concurrency: int, requests: int, max_tokens: int = 128) -> dict[str, float]:
    start = time.monotonic()
    with cf.ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda _: stream(stub, request(model, max_tokens)), range(requests)))
    wall = time.monotonic() - start
    tokens = sum(sum(len(c.token_ids) for c in chunks) for chunks, _ in results)
    ttfts = sorted(t for _, t in results)
    return {"concurrency": concurrency, "requests": requests, "output_tok_s": round(tokens / wall, 1),
            "ttft_p50_s": round(ttfts[len(ttfts) // 2], 3), "wall_s": round(wall, 2)}


def make_stub(address: str) -> tuple[grpc.Channel, Any]:
    channel = grpc.insecure_channel(address)
    return channel, inference_pb2_grpc.InferenceServiceStub(channel)
