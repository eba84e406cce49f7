"""Cache and session awareness: a multi-turn chat workload (growing history, a shared system
prompt) on 3 model servers with the real torch engine, routed by round_robin, least_load and
meshserve in turn. Each policy's run uses its own system prompt so no run inherits another's
prefix cache."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import running_mesh

from .common import pct, progress, start_router

MODEL = "smollm2"
SESSIONS = int(os.environ.get("BENCH_SESSIONS", "16"))
TURNS = int(os.environ.get("BENCH_TURNS", "4"))
MAX_TOKENS = int(os.environ.get("BENCH_MAX_TOKENS", "8"))
POLICIES = ("round_robin", "least_load", "meshserve")
SYSTEM = ("You are the support assistant of a shipping company. Answer briefly and politely. "
          "Customers ask about parcels, delivery windows, customs forms, damaged goods, refunds "
          "and pick-up points. Never invent tracking numbers; ask for them instead. ") * 3
QUESTIONS = ["Where is my parcel?", "Can I change the delivery address?",
             "The box arrived damaged, what now?", "How long do customs take?",
             "Can a neighbour sign for it?", "How do I get a refund?"]


def _record(sid: int) -> str:
    """A session's own long context (its order history), as chat sessions carry in practice:
    what a cache-blind policy has to prefill again on every server it lands on."""
    items = [f"order {sid}-{k}: {3 + (sid * 7 + k) % 9} parcels to depot {(sid + k) % 13}, "
             f"status {'delivered' if (sid + k) % 3 else 'in transit'}" for k in range(24)]
    return f"My customer record (customer {sid}): " + "; ".join(items) + "."


async def _session(stub, policy: str, sid: int, ttfts: list[float], tokens: list[int]) -> None:
    history = [("system", f"[{policy}] {SYSTEM}"), ("user", _record(sid)),
               ("assistant", "Thank you, I have your record. How can I help?")]
    for turn in range(TURNS):
        history.append(("user", f"Question {turn}: {QUESTIONS[(sid + turn) % 6]}"))
        req = inference_pb2.GenerateRequest(model=MODEL, session_id=f"{policy}-{sid}")
        for role, content in history:
            req.messages.add(role=role, content=content)
        req.sampling.max_tokens = MAX_TOKENS
        start = time.perf_counter()
        first = None
        text = []
        async for chunk in stub.GenerateStream(req, timeout=600):
            if first is None and chunk.token_ids:
                first = time.perf_counter() - start
            text.append(chunk.text)
            tokens.append(len(chunk.token_ids))
        ttfts.append(first if first is not None else time.perf_counter() - start)
        history.append(("assistant", "".join(text).strip() or "..."))


async def _run_policy(address: str, policy: str) -> dict:
    channel = grpc.aio.insecure_channel(address)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    ttfts: list[float] = []
    tokens: list[int] = []
    start = time.perf_counter()
    await asyncio.gather(*(_session(stub, policy, s, ttfts, tokens) for s in range(SESSIONS)))
    wall = time.perf_counter() - start
    await channel.close()
    return {"ttft_p50_s": round(pct(ttfts, 50), 4), "ttft_p99_s": round(pct(ttfts, 99), 4),
            "output_tok_s": round(sum(tokens) / wall, 2), "requests": len(ttfts),
            "wall_s": round(wall, 1)}


def run() -> dict:
    progress(f"multiturn: starting 3 torch servers (threads=1), {SESSIONS} sessions x {TURNS} "
             f"turns, {MAX_TOKENS} tokens per answer")
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        plan = MeshPlan(data_dir=Path(tmp), base_port=0, lease_ttl=5, load_timeout_s=600,
                        servers=[ServerPlan(f"server-{i}", [f"{MODEL}=torch:embedded"],
                                            engine_options=["threads=1"]) for i in range(3)])
        with running_mesh(plan) as mesh:
            routers = {"meshserve": mesh.routers[0]}
            for policy in POLICIES:
                if policy not in routers:
                    routers[policy] = start_router(mesh, f"router-{policy}", "--policy", policy)
            out = {}
            for policy in POLICIES:
                progress(f"multiturn: {policy} ...")
                out[policy] = asyncio.run(_run_policy(routers[policy], policy))
                progress(f"multiturn: {policy}: {out[policy]}")
            out["workload"] = {"sessions": SESSIONS, "turns": TURNS, "max_tokens": MAX_TOKENS,
                               "servers": 3, "engine": "torch smollm2 threads=1"}
            return out
