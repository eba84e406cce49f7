"""The diurnal phase: the same compressed day played at the same moments to two models on two
disjoint groups of servers, one scaled reactively only, the other with the predictive floor, so
both meet the same machine noise. Each model's rate history holds two earlier days seeded from the
trace with Poisson noise, as a mesh that has run for days would have recorded it."""

from __future__ import annotations

import asyncio
import math
import time

from meshserve.v1 import autoscale_pb2 as asp

from services.common import keyspace
from services.common.etcd_client import EtcdClient
from services.controlplane.autoscaler.backtest import backtest
from services.controlplane.autoscaler.history import RateHistory

from . import traces
from .config import Settings
from .loadgen import Load, Request
from .phases import Ctx, _decision, _ready
from .watch import ModelWatch, Watcher

RUNS = (("day-reactive", "react", False), ("day-predictive", "pred", True))


async def seed_history(etcd: EtcdClient, model: str, ctx: Ctx, first_load: float) -> list[float]:
    """Two days of buckets before `first_load`'s bucket; returns the rates written."""
    s = ctx.s
    season = round(s.season_s / s.bucket_s)
    rate = traces.day(s)
    start_bucket = math.floor(first_load / s.bucket_s)
    buckets = list(range(start_bucket - 2 * season, start_bucket))
    taus = [b * s.bucket_s - first_load + day_offset(s) for b in buckets]
    rates = traces.noisy_rates(rate, taus, s.bucket_s, s.seed + 7)
    history = RateHistory(model, s.bucket_s, keep=3 * season)
    history.first, history.rates = buckets[0], list(rates)
    history.dirty = set(range(buckets[0] // 64, buckets[-1] // 64 + 1))
    puts, _, _ = history.pending()
    for key, value in puts.items():
        await etcd.put(key, value)
    return rates


def day_offset(s: Settings) -> float:
    """Time of day when the load starts: the warm-up ends as the morning ramp begins, so the
    measured window is one whole day from the ramp, and the set-up before the warm-up (when the
    leader sees no traffic yet) falls into the night, as the seeded history says it should."""
    return 0.2 * s.season_s - s.warmup_s


def _violations(requests: list[Request], start: float, end: float, slo: float) -> tuple[int, int]:
    """(requests sent in the window, of which failed or slower to the first token than the SLO)."""
    window = [r for r in requests if start <= r.sent < end]
    bad = sum(1 for r in window if r.code != "OK" or r.ttft is None or r.ttft > slo)
    return len(window), bad


async def diurnal_phase(ctx: Ctx, etcd: EtcdClient) -> dict:
    s = ctx.s
    first_load = math.ceil((time.time() + s.load_seconds + 25) / s.bucket_s) * s.bucket_s
    watches = []
    for model, region, predictive in RUNS:
        await seed_history(etcd, model, ctx, first_load)
        await ctx.deploy(model, region)
        await ctx.policy(model=model, min_replicas=1, max_replicas=s.diurnal_max_replicas,
                         target_utilization=s.target_utilization, predictive=predictive,
                         bucket_s=s.bucket_s, season_s=s.season_s)
        watches.append(ModelWatch(model, s.diurnal_max_replicas, region))
    for model, _, _ in RUNS:
        await ctx.until(lambda m=model: _ready(ctx, m, 1), 120, f"{model} READY")
    await asyncio.sleep(max(0.0, first_load - time.time()))
    day = traces.day(s)
    offset = day_offset(s)
    times = traces.arrivals(lambda t: day(t + offset), s.warmup_s + s.season_s, s.seed + 1)
    loads = [Load(ctx.envoy, model, s.max_tokens, ctx.prompt()) for model, _, _ in RUNS]
    async with Watcher(ctx.controlplane, watches):
        start = time.time()
        await asyncio.gather(*(load.play(times) for load in loads))
    window = (start + s.warmup_s, start + s.warmup_s + s.season_s)
    out: dict = {"window_s": s.season_s, "slo_ttft_s": s.slo_ttft_s}
    for (model, _, predictive), load, watch in zip(RUNS, loads, watches, strict=True):
        sent, bad = _violations(load.requests, *window, s.slo_ttft_s)
        key = "predictive" if predictive else "reactive"
        out[key] = {"model": model, "requests": sent, "slo_violations": bad,
                    "failed": sum(1 for r in load.requests if r.code != "OK"),
                    "replica_seconds": round(watch.replica_seconds(*window), 1),
                    "peak_placed": max((x.placed for x in watch.samples), default=0),
                    "limit_violations": len(watch.breaches),
                    "decisions": [_decision(d, window[0]) for d in watch.decided()]}
    explained = await ctx.auto.ExplainAutoscale(asp.ExplainAutoscaleRequest(model=RUNS[1][0]),
                                                timeout=5)
    out["predictive"]["lead_time_s"] = round(explained.lead_time_s, 2)
    out["predictive"]["forecast_note"] = explained.forecast_note
    out["backtest"] = await _backtest(ctx, etcd, explained.lead_time_s)
    return out


async def _backtest(ctx: Ctx, etcd: EtcdClient, lead_s: float) -> dict:
    """The backtest command's numbers on the predictive model's recorded history (two seeded
    days and the day just measured)."""
    s = ctx.s
    items, _ = await etcd.get_prefix(keyspace.history_prefix(RUNS[1][0]))
    history = RateHistory(RUNS[1][0], s.bucket_s, keep=10_000)
    history.load([r for r in (keyspace.decode(asp.RateHistory, v) for _, v in sorted(items.items()))
                  if r is not None], time.time() + s.bucket_s)
    rates = [0.0 if math.isnan(r) else r for r in history.rates]
    season = round(s.season_s / s.bucket_s)
    per_replica = s.max_running * s.target_utilization / (s.max_tokens / s.tokens_per_second
                                                          + s.first_token_latency_s)
    try:
        result = backtest(rates, season, math.ceil(lead_s / s.bucket_s), per_replica, 1,
                          s.diurnal_max_replicas, s.bucket_s)
    except ValueError as exc:
        return {"error": str(exc), "buckets": len(rates)}
    return {"buckets": len(rates), "wape": round(result.wape, 3), "mape": round(result.mape, 3),
            "rmse": round(result.rmse, 3),
            "reactive_short_buckets": result.reactive_short,
            "predictive_short_buckets": result.predictive_short,
            "reactive_replica_s": result.reactive_replica_s,
            "predictive_replica_s": result.predictive_replica_s, "trace": rates}
