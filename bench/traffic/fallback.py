"""Fallback with the primary pool SIGKILLed (sim, streaming, 3 servers: one in region `gpu`, two
in region `cpu`, as a TensorRT-LLM GPU pool spilling to a CPU torch pool would be placed).

`fb` = fallback [fb@gpu, fb@cpu], resume_across_links (the same weights on both pools, so a
stream the kill broke continues on the CPU pool after the tokens the client has). Streaming
clients run against `fb`; the gpu server is SIGKILLed mid-run. `fallback_failed` counts requests
that failed or whose text differs from the expected answer. The hop's cost: p50 latency of
answers served through the fallback link after the kill, minus p50 of streams sent straight to
fb@cpu at the same time (half as many clients alongside), so both see the same machine load.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

from meshserve.v1 import traffic_pb2 as tp

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan

from .common import Control, percentile
from .load import Load

SIM = {"tokens_per_second": "200", "max_running": "64"}
MAX_TOKENS = 16


def plan(data_dir: Path) -> MeshPlan:
    return MeshPlan(data_dir=data_dir, base_port=0, routers=2, servers=[
        ServerPlan("gpu-0", region="gpu", zone="gpu-a"),
        ServerPlan("cpu-0", region="cpu", zone="cpu-a"), ServerPlan("cpu-1", region="cpu", zone="cpu-b")])


def _p50_ms(outcomes) -> float | None:
    p = percentile([o.latency for o in outcomes], 0.5)
    return None if p is None else p * 1000


async def _phase(mesh: LocalMesh, workers: int, seconds: float, kill_at: float,
                 pid: int) -> tuple[list, list, float]:
    """Streams on `fb` and, alongside under the same conditions, straight on fb@cpu."""
    load = Load(mesh.envoy, "fb", workers, max_tokens=MAX_TOKENS, stream=True)
    direct = Load(mesh.envoy, "fb@cpu", workers // 2, max_tokens=MAX_TOKENS, stream=True)
    load.start()
    direct.start()
    await asyncio.sleep(kill_at)
    os.kill(pid, signal.SIGKILL)
    killed_at = time.time()
    await asyncio.sleep(seconds - kill_at)
    await load.stop()
    await direct.stop()
    return load.outcomes, direct.outcomes, killed_at


async def run(data_dir: Path, quick: bool) -> dict:
    mesh = LocalMesh(plan(data_dir))
    await asyncio.to_thread(mesh.start)
    ctl = Control(mesh)
    workers = 8
    try:
        await ctl.deploy("fb@gpu", 1, SIM, regions={"gpu": 1})
        await ctl.deploy("fb@cpu", 2, SIM, regions={"cpu": 2})
        await ctl.set_policy(tp.TrafficPolicy(name="fb", fallback=tp.FallbackPolicy(
            links=["fb@gpu", "fb@cpu"], resume_across_links=True)))
        await ctl.routed("fb", "fb[fallback:0]>fb@gpu")
        run_s, kill_s = (12, 4) if quick else (25, 8)
        outcomes, direct_all, killed_at = await _phase(mesh, workers, run_s, kill_s, mesh.children["gpu-0"].pid or 0)
        direct = [o for o in direct_all if o.started >= killed_at]
        failed = [o for o in outcomes if o.error or not o.text_ok]
        after = [o for o in outcomes if not o.error and o.started >= killed_at]
        via = [o for o in after if "fallback:1" in o.route]
        settled = [o for o in via if o.started >= killed_at + 5]
        p50_direct, p50_via = _p50_ms([o for o in direct if not o.error]), _p50_ms(via)
        return {
            "requests": len(outcomes), "fallback_failed": len(failed),
            "failed_samples": sorted({o.error or "wrong text" for o in failed})[:5],
            "broken_by_kill_and_resumed": len([o for o in outcomes if o.started < killed_at < o.ended
                                               and "fallback:1" in o.route]),
            "routes": dict(Counter(o.route for o in outcomes if not o.error)),
            "p50_direct_ms": p50_direct, "p50_via_fallback_ms": p50_via,
            "p50_via_fallback_settled_ms": _p50_ms(settled),
            "fallback_hop_p50_ms": None if p50_direct is None or p50_via is None else p50_via - p50_direct,
            "fallback_hop_p50_settled_ms": None if p50_direct is None or not settled
            else (_p50_ms(settled) or 0.0) - p50_direct,
            "direct_requests": len(direct), "direct_failed": len([o for o in direct_all if o.error or not o.text_ok]),
            "max_tokens": MAX_TOKENS, "workers": workers,
        }
    finally:
        await ctl.close()
        await asyncio.to_thread(mesh.stop)
