"""Latency Envoy plus router add over calling a model server directly (sim engine, short
answers, open loop), and the largest request rate one router process sustains."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import grpc
from meshserve.v1 import (inference_pb2, inference_pb2_grpc, modelserver_pb2,
                          modelserver_pb2_grpc)

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.conftest import running_mesh

from .common import open_loop, pct, progress

MODEL = "echo"
RATES = (100, 500, 1000)
SECONDS = 4.0
MAX_RPS_STEPS = (200, 300, 400, 500, 700, 1000, 1500)
SIM = ["tokens_per_second=20000", "first_token_latency_s=0.0005", "max_running=512",
       "max_waiting=4096"]


def _public() -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=MODEL, prompt="ping pong")
    r.sampling.max_tokens = 2
    return r


def _internal() -> modelserver_pb2.ModelServerServiceGenerateRequest:
    r = modelserver_pb2.ModelServerServiceGenerateRequest(model=MODEL, prompt="ping pong")
    r.sampling.max_tokens = 2
    return r


async def _measure(mesh) -> dict:
    targets = {"direct": mesh.servers["server-0"], "router": mesh.routers[0],
               "envoy": mesh.envoy}
    channels = {k: grpc.aio.insecure_channel(a) for k, a in targets.items()}
    direct = modelserver_pb2_grpc.ModelServerServiceStub(channels["direct"])
    public = {k: inference_pb2_grpc.InferenceServiceStub(channels[k]) for k in ("router", "envoy")}
    internal, pub = _internal(), _public()

    def caller(path: str):
        if path == "direct":
            async def one() -> None:
                async for _ in direct.Generate(internal, timeout=10):
                    pass
        else:
            stub = public[path]

            async def one() -> None:
                async for _ in stub.GenerateStream(pub, timeout=10):
                    pass
        return one

    for path in targets:  # warm connections and code paths
        await open_loop(50, 1.0, caller(path))
    out: dict = {}
    for rate in RATES:
        row: dict = {}
        for path in targets:
            lat, failed, achieved = await open_loop(rate, SECONDS, caller(path))
            row[path] = {"p50_ms": pct(lat, 50) * 1e3, "p99_ms": pct(lat, 99) * 1e3,
                         "failed": failed, "achieved_rps": round(achieved, 1)}
            progress(f"overhead {rate}/s {path}: p50 {row[path]['p50_ms']:.2f} ms "
                     f"p99 {row[path]['p99_ms']:.2f} ms failed {failed}")
        out[str(rate)] = {
            "added_p50_ms": round(row["envoy"]["p50_ms"] - row["direct"]["p50_ms"], 3),
            "added_p99_ms": round(row["envoy"]["p99_ms"] - row["direct"]["p99_ms"], 3),
            "router_only_added_p50_ms": round(row["router"]["p50_ms"] - row["direct"]["p50_ms"], 3),
            "router_only_added_p99_ms": round(row["router"]["p99_ms"] - row["direct"]["p99_ms"], 3),
            "paths": {k: {m: round(v, 3) for m, v in d.items()} for k, d in row.items()}}
    best = 0
    steps = {}
    for rate in MAX_RPS_STEPS:
        lat, failed, achieved = await open_loop(rate, 3.0, caller("router"))
        ok = failed == 0 and achieved >= 0.95 * rate and pct(lat, 99) < 0.25
        steps[str(rate)] = {"achieved_rps": round(achieved, 1), "failed": failed,
                            "p99_ms": round(pct(lat, 99) * 1e3, 2), "sustained": ok}
        progress(f"max-rps step {rate}/s: achieved {achieved:.0f}/s p99 "
                 f"{pct(lat, 99) * 1e3:.1f} ms failed {failed} -> {'ok' if ok else 'not sustained'}")
        if not ok:
            break
        best = rate
    for ch in channels.values():
        await ch.close()
    return {"overhead": out, "max_rps_one_router": best, "max_rps_steps": steps}


def run() -> dict:
    progress("overhead: starting etcd, control plane, 1 sim server, 1 router, Envoy")
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        plan = MeshPlan(data_dir=Path(tmp), base_port=0, lease_ttl=5,
                        servers=[ServerPlan("server-0", [f"{MODEL}=sim"], engine_options=SIM)])
        with running_mesh(plan) as mesh:
            return asyncio.run(_measure(mesh))
