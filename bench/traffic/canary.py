"""Canary under continuous load (sim, 3 servers, 2 routers, Envoy).

1. Rollout: clients ask for `app` (an alias of app@v1, 2 replicas). app@v2 is deployed with a 5 s
   load and, at once, a canary app@v1 -> app@v2 (10, 50, 100%, 15 s steps) is set, so the policy
   names v2 while it is still LOADING. Every answer says which replica served it; one served by
   a replica before that replica's READY time counts in `to_not_ready`. The canary must step to
   PROMOTED with no client error.
2. Split accuracy: 10,000 requests on a 90/10 split of app@v1 / app@v2 (both READY):
   `split_error_points` = the largest |observed % - weight %|.
3. Rollback: app@v3 (error_rate 0.5 from 20 s after it loaded) becomes the canary of app@v2 at
   10% with the default margins (5 points, TTFT +50%, 20 requests, 30 s window). `rollback_s` =
   the leader's rollback decision - the moment the fault began; also when the routers stopped
   sending to v3.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

from meshserve.v1 import traffic_pb2 as tp

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan

from .common import Control
from .load import Load

FAST = {"tokens_per_second": "2000", "max_running": "64"}


def plan(data_dir: Path) -> MeshPlan:
    return MeshPlan(data_dir=data_dir, base_port=0, routers=2,
                    servers=[ServerPlan(f"server-{i}", zone=f"zone-{i}") for i in range(3)])


def canary(name: str, stable: str, canary_: str, steps: list[int], **kw: Any) -> tp.TrafficPolicy:
    return tp.TrafficPolicy(name=name, canary=tp.CanaryPolicy(stable=stable, canary=canary_, steps=steps, **kw))


async def _watch_canary(ctl: Control, name: str, until: set[int], timeout: float) -> list[dict]:
    """Phase and step changes as they are seen, until the phase is one of `until`."""
    timeline: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = await ctl.policy(name)
        key = (tp.CanaryPhase.Name(s.canary.phase), s.canary.step, s.canary_weight)
        if not timeline or (timeline[-1].get("phase"), timeline[-1].get("step"), timeline[-1].get("weight")) != key:
            timeline.append({"at": time.time(), "phase": tp.CanaryPhase.Name(s.canary.phase),
                             "step": s.canary.step, "weight": s.canary_weight, "reason": s.canary.reason,
                             "updated_ms": s.canary.updated_ms})
        if s.canary.phase in until:
            return timeline
        await asyncio.sleep(0.25)
    timeline.append({"at": time.time(), "timeout": True})
    return timeline


async def rollout(mesh: LocalMesh, ctl: Control, workers: int) -> dict:
    await ctl.deploy("app@v1", 2, FAST)
    load = Load(mesh.envoy, "app", workers)
    load.start()
    await asyncio.sleep(3)
    await ctl.deploy("app@v2", 2, {**FAST, "load_s": "5"}, wait=False)
    policy_at = time.time()
    await ctl.set_policy(canary("app", "app@v1", "app@v2", [10, 50, 100], step_seconds=15,
                                max_ttft_p95_increase=1.0))
    timeline = await _watch_canary(ctl, "app", {tp.CANARY_PHASE_PROMOTED, tp.CANARY_PHASE_ROLLED_BACK}, 180)
    await asyncio.sleep(2)
    await load.stop()
    ready = await ctl.ready_since_ms("app@v2")
    early = [o for o in load.outcomes if o.deployment == "app@v2"
             and (o.server not in ready or o.ended * 1000 < ready[o.server])]
    errors = [o for o in load.outcomes if o.error or not o.text_ok]
    first_v2 = min((o.ended for o in load.outcomes if o.deployment == "app@v2"), default=None)
    return {"requests": len(load.outcomes), "to_not_ready": len(early), "errors": len(errors),
            "error_samples": sorted({o.error for o in errors})[:5],
            "policy_set_at": policy_at, "v2_ready_at_ms": ready, "first_v2_answer_at": first_v2,
            "served": dict(Counter(o.deployment for o in load.outcomes)), "timeline": timeline,
            "promoted": timeline[-1].get("phase") == "CANARY_PHASE_PROMOTED"}


async def split_accuracy(mesh: LocalMesh, ctl: Control, workers: int, n: int) -> dict:
    weights = {"app@v1": 90, "app@v2": 10}
    await ctl.set_policy(tp.TrafficPolicy(name="split", split=tp.SplitPolicy(
        targets=[tp.WeightedTarget(target=t, weight=w) for t, w in weights.items()])))
    await ctl.routed("split", "split[split]>")
    t0 = time.monotonic()
    outcomes = await Load(mesh.envoy, "split", workers, max_tokens=1).run(n)
    seconds = time.monotonic() - t0
    ok = [o for o in outcomes if not o.error]
    counts = Counter(o.deployment for o in ok)
    observed = {t: 100.0 * counts[t] / max(1, len(ok)) for t in weights}
    return {"requests": n, "answered": len(ok), "errors": n - len(ok), "weights": weights,
            "observed_percent": observed, "requests_per_s": n / seconds,
            "split_error_points": max(abs(observed[t] - w) for t, w in weights.items())}


async def rollback(mesh: LocalMesh, ctl: Control, workers: int, fault_after_s: float) -> dict:
    await ctl.deploy("app@v3", 1, {**FAST, "error_rate": "0.5", "error_after_s": str(fault_after_s)})
    ready = await ctl.ready_since_ms("app@v3")
    fault_at = max(ready.values()) / 1000 + fault_after_s
    load = Load(mesh.envoy, "app", workers)
    load.start()
    await ctl.set_policy(canary("app", "app@v2", "app@v3", [10, 50, 100], step_seconds=120))
    timeline = await _watch_canary(ctl, "app", {tp.CANARY_PHASE_ROLLED_BACK, tp.CANARY_PHASE_PROMOTED},
                                   fault_after_s + 180)
    await asyncio.sleep(5)
    await load.stop()
    last = timeline[-1]
    decided = last.get("updated_ms", 0) / 1000 if last.get("phase") == "CANARY_PHASE_ROLLED_BACK" else None
    last_v3 = max((o.ended for o in load.outcomes if o.deployment == "app@v3" or
                   (o.error and "app@v3" in o.error)), default=None)
    client_errors = [o for o in load.outcomes if o.error]
    return {"fault_at": fault_at, "decided_at": decided, "last_v3_answer_at": last_v3,
            "rollback_s": None if decided is None else decided - fault_at,
            "routers_off_v3_s": None if last_v3 is None or decided is None else last_v3 - fault_at,
            "reason": last.get("reason", ""), "timeline": timeline, "requests": len(load.outcomes),
            "client_errors": len(client_errors),
            "client_errors_after_fault_before_rollback": len(
                [o for o in client_errors if decided is not None and fault_at <= o.ended <= decided + 1])}


async def run(data_dir: Path, quick: bool) -> dict:
    from services.localmesh.mesh import LocalMesh as Mesh

    mesh = Mesh(plan(data_dir))
    await asyncio.to_thread(mesh.start)
    ctl = Control(mesh)
    try:
        out: dict = {"rollout": await rollout(mesh, ctl, 8 if quick else 16)}
        out["split"] = await split_accuracy(mesh, ctl, 16 if quick else 32, 1000 if quick else 10_000)
        out["rollback"] = await rollback(mesh, ctl, 8 if quick else 16, 10 if quick else 20)
        return out
    finally:
        await ctl.close()
        await asyncio.to_thread(mesh.stop)
