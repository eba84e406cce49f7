"""Failover: SIGKILL one of three servers in the middle of a steady stream of requests through
Envoy; every request must still complete (retried before its first token or migrated after)."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import running_mesh

from .common import progress

MODEL = "echo"
RATE, SECONDS, KILL_AT = 40.0, 10.0, 4.0
SIM = ["tokens_per_second=50"]  # 25 tokens take 0.5 s: a kill lands mid-stream for ~20 requests


async def _drive(mesh) -> dict:
    channel = grpc.aio.insecure_channel(mesh.envoy)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    ok = failed = 0
    errors: list[str] = []

    async def one(i: int) -> None:
        nonlocal ok, failed
        req = inference_pb2.GenerateRequest(model=MODEL, prompt=f"failover request {i} a b c",
                                            session_id=f"s{i % 16}")
        req.sampling.max_tokens = 25
        try:
            chunks = [c async for c in stub.GenerateStream(req, timeout=30)]
            assert chunks[-1].usage.completion_tokens == 25
            ok += 1
        except Exception as exc:  # noqa: BLE001 - counted and reported
            failed += 1
            errors.append(repr(exc)[:200])

    async def killer() -> None:
        await asyncio.sleep(KILL_AT)
        progress("failover: SIGKILL server-1")
        mesh.sup.kill(mesh.children["server-1"])

    kill = asyncio.create_task(killer())
    tasks = []
    for i in range(int(RATE * SECONDS)):
        tasks.append(asyncio.create_task(one(i)))
        await asyncio.sleep(1 / RATE)
    await asyncio.gather(*tasks, kill)
    await channel.close()
    metrics = _router_counters(mesh)
    progress(f"failover: {ok + failed} requests, {failed} failed; {metrics}")
    return {"requests": ok + failed, "failed": failed, "errors": errors[:5], **metrics}


def _router_counters(mesh) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"http://{mesh.metrics['router0']}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {"retries": 0.0, "migrations": 0.0}
    for line in text.splitlines():
        if line.startswith("meshserve_router_retries_total{"):
            out["retries"] += float(line.split()[-1])
        if line.startswith("meshserve_router_migrations_total{"):
            out["migrations"] += float(line.split()[-1])
    return out


def run() -> dict:
    progress("failover: starting a mesh with 3 sim servers")
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        plan = MeshPlan(data_dir=Path(tmp), base_port=0, lease_ttl=3,
                        servers=[ServerPlan(f"server-{i}", [f"{MODEL}=sim"], engine_options=SIM)
                                 for i in range(3)])
        with running_mesh(plan) as mesh:
            return asyncio.run(_drive(mesh))
