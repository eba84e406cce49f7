"""The ramp phase (scale-up delay, scale-down time, a budget that binds) and the scale-from-zero
phase (a burst at zero replicas: failures and time to first token)."""

from __future__ import annotations

import asyncio
import re
import statistics
import time
from dataclasses import dataclass

import grpc
from meshserve.v1 import autoscale_pb2 as asp
from meshserve.v1 import autoscale_pb2_grpc, controlplane_pb2_grpc
from meshserve.v1 import controlplane_pb2 as cp

from tests.helpers import metrics_text

from . import traces
from .config import Settings
from .loadgen import Load
from .watch import ModelWatch, Watcher


@dataclass
class Ctx:
    s: Settings
    envoy: str
    controlplane: str
    router_metrics: str
    auto: autoscale_pb2_grpc.AutoscaleServiceStub
    ctl: controlplane_pb2_grpc.ControlPlaneServiceStub

    def prompt(self) -> str:
        return " ".join(f"w{i}" for i in range(self.s.prompt_words))

    async def deploy(self, model: str, region: str) -> None:
        s = self.s
        spec = cp.ModelSpec(name=model, backend="sim", replicas=1,
                            regions=[cp.RegionRequirement(region=region)],
                            options={"tokens_per_second": str(s.tokens_per_second),
                                     "first_token_latency_s": str(s.first_token_latency_s),
                                     "max_running": str(s.max_running),
                                     "load_s": str(s.load_seconds)})
        await self.ctl.DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)

    async def policy(self, **fields) -> None:
        await self.auto.SetAutoscalePolicy(asp.SetAutoscalePolicyRequest(
            policy=asp.AutoscalePolicy(enabled=True, **fields)), timeout=10)

    async def state(self, model: str) -> asp.GetAutoscaleResponse:
        return await self.auto.GetAutoscale(asp.GetAutoscaleRequest(model=model), timeout=5)

    async def until(self, check, timeout: float, what: str) -> float:
        """Poll an async check every 0.25 s; the wall time it held, or TimeoutError."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if await check():
                    return time.time()
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.25)
        raise TimeoutError(f"{what} did not happen within {timeout:.0f}s")


def _crossed(load: Load, target: float, after: float) -> float | None:
    """When the requests in flight first went above one replica's target."""
    return next((t for t, n in load.peak_in_flight if t >= after and n > target), None)


async def ramp_phase(ctx: Ctx) -> dict:
    s, model, region = ctx.s, "ramp", "react"
    await ctx.deploy(model, region)
    await ctx.auto.SetScalingBudgets(asp.SetScalingBudgetsRequest(budgets=asp.ScalingBudgets(
        budgets=[asp.ScalingBudget(region=region, max_replicas=s.ramp_budget)])), timeout=10)
    await ctx.policy(model=model, min_replicas=1, max_replicas=s.ramp_max_replicas)
    await ctx.until(lambda: _ready(ctx, model, 1), 120, "the ramp model READY")
    watch = ModelWatch(model, s.ramp_max_replicas, region, s.ramp_budget)
    load = Load(ctx.envoy, model, s.max_tokens, ctx.prompt())
    duration = s.ramp_up_s + s.ramp_hold_s
    times = traces.arrivals(traces.ramp(s), duration, s.seed)
    async with Watcher(ctx.controlplane, [watch]):
        start = time.time()
        await load.play(times)
        stopped = start + times[-1]  # the last request was sent then
        target = (await ctx.auto.ExplainAutoscale(asp.ExplainAutoscaleRequest(model=model),
                                                  timeout=5)).target_concurrency
        at_min = await ctx.until(lambda: _desired(ctx, model, 1), s.down_timeout_s,
                                 "back to min_replicas")
        ready_min = await ctx.until(lambda: _ready(ctx, model, 1, exact=True), 60, "one replica")
    crossed = _crossed(load, target, start)
    ups = [d for d in watch.decided() if d.to_replicas > d.from_replicas and d.at_ms / 1000 >= start]
    downs = [d for d in watch.decided() if d.to_replicas == 1 and d.at_ms / 1000 >= stopped]
    decided_min = downs[0].at_ms / 1000 if downs else at_min
    await ctx.ctl.UndeployModel(cp.UndeployModelRequest(name=model), timeout=10)
    await ctx.auto.SetScalingBudgets(asp.SetScalingBudgetsRequest(budgets=asp.ScalingBudgets()),
                                     timeout=10)
    return {
        "target_concurrency": target, "load_crossed_target_at_s": _rel(crossed, start),
        "first_scale_up_at_s": _rel(ups[0].at_ms / 1000 if ups else None, start),
        "scale_up_s": (ups[0].at_ms / 1000 - crossed) if ups and crossed else None,
        "scale_down_s": decided_min - stopped, "scale_down_ready_s": ready_min - stopped,
        "peak_desired": max((x.desired for x in watch.samples), default=0),
        "peak_placed": max((x.placed for x in watch.samples), default=0),
        "budget": s.ramp_budget, "max_replicas": s.ramp_max_replicas,
        "limits_reported": sorted(watch.limits_seen), "limit_violations": len(watch.breaches),
        "breaches": watch.breaches[:10], "requests": len(load.requests),
        "failed": sum(1 for r in load.requests if r.code != "OK"),
        "decisions": [_decision(d, start) for d in watch.decided()],
    }


async def zero_phase(ctx: Ctx, idle_unload_s: float) -> dict:
    s, model, region = ctx.s, "zero", "pred"
    await ctx.deploy(model, region)
    await ctx.policy(model=model, min_replicas=0, max_replicas=2, scale_to_zero=True,
                     zero_grace_s=s.zero_grace_s, stable_window_s=20)
    await ctx.until(lambda: _ready(ctx, model, 1), 120, "the zero model READY")
    since = time.time()
    await ctx.until(lambda: _at_zero(ctx, model), 180, "scaled to zero")
    to_zero = time.time() - since
    await asyncio.sleep(idle_unload_s + 2)  # the released replica unloads: a cold start follows
    before = _activation_count(metrics_text(ctx.router_metrics), model)
    load = Load(ctx.envoy, model, s.max_tokens, ctx.prompt())
    await load.burst(s.zero_burst)
    ttfts = sorted(r.ttft for r in load.requests if r.ttft is not None)
    after = _activation_count(metrics_text(ctx.router_metrics), model)
    await ctx.ctl.UndeployModel(cp.UndeployModelRequest(name=model), timeout=10)
    return {"burst": s.zero_burst, "from_zero_failed": sum(1 for r in load.requests if r.code != "OK"),
            "codes": sorted({r.code for r in load.requests}), "idle_to_zero_s": to_zero,
            "ttft_from_zero_p50_s": statistics.median(ttfts) if ttfts else None,
            "ttft_from_zero_max_s": ttfts[-1] if ttfts else None,
            "router_activation_waits_counted": after - before}


def _activation_count(text: str, model: str) -> float:
    pattern = 'meshserve_router_activation_wait_seconds_count{model="' + model + '"} '
    m = re.search(re.escape(pattern) + r"([0-9.e+]+)", text)
    return float(m.group(1)) if m else 0.0


async def _ready(ctx: Ctx, model: str, n: int, exact: bool = False) -> bool:
    got = (await ctx.state(model)).ready_replicas
    return got == n if exact else got >= n


async def _desired(ctx: Ctx, model: str, n: int) -> bool:
    return (await ctx.state(model)).state.desired_replicas == n


async def _at_zero(ctx: Ctx, model: str) -> bool:
    st = await ctx.state(model)
    return st.state.desired_replicas == 0 and st.placed_replicas == 0 and st.ready_replicas == 0


def _rel(t: float | None, start: float) -> float | None:
    return None if t is None else round(t - start, 2)


def _decision(d: asp.AutoscaleDecision, start: float) -> dict:
    return {"at_s": round(d.at_ms / 1000 - start, 2), "from": d.from_replicas, "to": d.to_replicas,
            "reason": d.reason, "limit": d.limit}
