"""Phase `routing`: precise (KV-event) against approximate routing, scaled down.

Three torch servers with small KV pools share a store; tenants with long system prompts (two
tenants per prompt text, as when tenants start from one template - their keys differ, salted)
send short questions through one router, a few at a time. The same workload runs with the router
on `round_robin`, `meshserve_text` (today's text-hash guess) and `meshserve` (KV events), each from
cold caches (pools and store flushed, router restarted). P90 TTFT and throughput per mode; P50/P90
also without each tenant's first request (cold in every mode, so it is a routing-blind floor).
"""

from __future__ import annotations

import asyncio
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc, modelserver_pb2, modelserver_pb2_grpc

from services.localmesh.components import grpc_serving
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan

from .common import percentile, text_of

log = logging.getLogger(__name__)
MODEL = "smollm2"
MODES = ("round_robin", "meshserve_text", "meshserve")


def _plan(tmp: Path, servers: int) -> MeshPlan:
    options = ["threads=1", "kv_cache_blocks=40", "max_context=2048", "max_running=8"]
    return MeshPlan(data_dir=tmp, base_port=0, lease_ttl=3, cache_store_bytes=96 << 20,
                    servers=[ServerPlan(f"server-{i}", [f"{MODEL}=torch:embedded"], engine_options=options)
                             for i in range(servers)])


def _start(mesh: LocalMesh) -> None:
    mesh.ports.check()
    mesh.sup.new_run()
    mesh.start_etcd()
    mesh.start_cache_store()
    mesh.start_controlplane(0)
    children = [mesh.start_server(s, wait=False) for s in mesh.plan.servers]
    for child, s in zip(children, mesh.plan.servers, strict=True):
        mesh.sup.wait_ready(child, partial(grpc_serving, mesh.servers[s.server_id]), mesh.plan.load_timeout_s,
                            "serving")


def _workload(tenants: int, per_tenant: int) -> list[inference_pb2.GenerateRequest]:
    systems = [f"You are the assistant of team {k}. " + text_of(420, seed=500 + k) for k in range(tenants // 2)]
    out = []
    for q in range(per_tenant):
        for t in range(tenants):
            req = inference_pb2.GenerateRequest(model=MODEL, tenant=f"tenant-{t}", bypass_response_cache=True)
            req.messages.add(role="system", content=systems[t // 2])
            req.messages.add(role="user", content=f"Question {q}: what is item {q * 7 + t}?")
            req.sampling.max_tokens = 8
            out.append(req)
    return out


async def _one(stub: inference_pb2_grpc.InferenceServiceStub, req: inference_pb2.GenerateRequest) -> dict:
    started = time.monotonic()
    first = None
    tokens = cached = prompt = 0
    server = ""
    async for chunk in stub.GenerateStream(req, timeout=600):
        if first is None and chunk.token_ids:
            first = time.monotonic() - started
        tokens += len(chunk.token_ids)
        server = chunk.served_by.server_id
        if chunk.HasField("usage"):
            cached, prompt = chunk.usage.cached_tokens, chunk.usage.prompt_tokens
    return {"ttft_s": first, "tokens": tokens, "cached_tokens": cached, "prompt_tokens": prompt, "server": server}


async def _drive(router: str, work: list[inference_pb2.GenerateRequest], concurrency: int,
                 cold: int = 0) -> dict[str, Any]:
    """Run `work` at `concurrency`; the first `cold` requests (each tenant's first, whose system
    prompt nobody has computed whatever the router does) are left out of the `warm` figures."""
    queue = list(enumerate(work))
    results: list[dict] = [{}] * len(work)
    async with grpc.aio.insecure_channel(router) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        async def client() -> None:
            while queue:
                i, req = queue.pop(0)
                results[i] = await _one(stub, req)
        started = time.monotonic()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.monotonic() - started
    ttfts = [r["ttft_s"] for r in results if r.get("ttft_s") is not None]
    warm = [r["ttft_s"] for r in results[cold:] if r.get("ttft_s") is not None]
    return {"requests": len(work), "wall_s": wall, "p50_ttft_s": percentile(ttfts, 50),
            "p90_ttft_s": percentile(ttfts, 90), "p50_ttft_warm_s": percentile(warm, 50),
            "p90_ttft_warm_s": percentile(warm, 90), "requests_per_s": len(work) / wall,
            "output_tok_s": sum(r["tokens"] for r in results) / wall,
            "cached_token_share": sum(r["cached_tokens"] for r in results)
            / max(1, sum(r["prompt_tokens"] for r in results)),
            "servers_used": sorted({r["server"] for r in results})}


async def _flush(mesh: LocalMesh) -> None:
    for address in mesh.servers.values():
        async with grpc.aio.insecure_channel(address) as channel:
            await modelserver_pb2_grpc.ModelServerServiceStub(channel).FlushCache(
                modelserver_pb2.FlushCacheRequest(shared=True), timeout=120)


def _restart_router(mesh: LocalMesh, mode: str) -> None:
    if "router0" in mesh.children:
        mesh.sup.stop_child(mesh.children["router0"])
    mesh.plan.router_args = ["--policy", mode]
    mesh.start_router(0)


async def _events_ready(mesh: LocalMesh) -> None:
    log_path = mesh.sup.log_dir / "router0.log"
    for _ in range(600):
        if log_path.exists() and log_path.read_text(errors="replace").count("prefix scoring on KV events"):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError("the router never loaded the tokenizer")


async def run(tmp: Path, quick: bool) -> dict[str, Any]:
    tenants, per_tenant, concurrency = (4, 2, 3) if quick else (6, 8, 3)
    work = _workload(tenants, per_tenant)
    mesh = LocalMesh(_plan(tmp, 3))
    out: dict[str, Any] = {"tenants": tenants, "requests_per_mode": len(work), "concurrency": concurrency,
                           "servers": 3, "kv_blocks_per_server": 40, "store_bytes": 96 << 20}
    try:
        await asyncio.to_thread(_start, mesh)
        for mode in MODES:
            await _flush(mesh)
            await asyncio.to_thread(_restart_router, mesh, mode)
            if mode == "meshserve":
                # KV events arrive on the load stream; the tokenizer loads in the background
                await _drive(mesh.routers[0], _workload(2, 1)[:1], 1)
                await _events_ready(mesh)
                await _flush(mesh)
            log.info("routing mode %s", mode)
            out[mode] = await _drive(mesh.routers[0], work, concurrency, cold=tenants)
            log.info("%s: %s", mode, out[mode])
    finally:
        mesh.stop()
    return out
