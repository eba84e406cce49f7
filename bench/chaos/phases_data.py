"""Phases 1-3: the data plane's processes fail under 300-token streams.

1. SIGKILL of the model server holding the most streams, restarted on its port.
2. SIGSTOP of the model server holding the most streams for a minute, then SIGCONT.
3. SIGKILL of the router relaying the most streams (clients resume), restarted on its port.
"""

from __future__ import annotations

import asyncio
import signal
import time

from bench.router.common import pct

from . import faults, probes
from .config import MODEL, RESTART_SERVING_WITHIN_S, RESUME_WITHIN_S, ROUTERS, SERVERS
from .phase import PhaseContext
from .record import Record

RESTART_TIMEOUT_S = 60.0


def _s(t: float | None, since: float) -> float | None:
    return None if t is None else round(t - since, 3)


def _restart_criterion(ctx: PhaseContext, what: str, seconds: float | None) -> None:
    ctx.criterion(f"{what} restarted on its port serves again", f"<= {RESTART_SERVING_WITHIN_S:.0f} s",
                  seconds, seconds is not None and seconds <= RESTART_SERVING_WITHIN_S)


async def _all_ended(records: list[Record], timeout: float) -> None:
    async def ended() -> bool:
        return all(r.ended_at is not None for r in records)

    await probes.until(ended, timeout)


def _continued(r: Record, t_stop: float, victim: str) -> float | None:
    """When a stream that was on the stopped server went on: its first chunk from another server,
    or its final status if it finished without one (the router ends a stream whose every token
    had arrived)."""
    t = r.first_chunk_elsewhere(t_stop, victim)
    if t is None and r.done and r.error is None and r.ended_at is not None:
        t = r.ended_at
    return t


def _victims_outcome(ctx: PhaseContext, records: list[Record]) -> None:
    ctx.figures["victim_streams_completed_exact"] = sum(
        1 for r in records if r.error is None and r.finish_reason and r.check().exact and r.usage_ok())
    ctx.figures["victim_streams_resumed_by_client"] = sum(1 for r in records if r.resumes)


async def server_sigkill(ctx: PhaseContext) -> None:
    s, mesh = ctx.settings, ctx.mesh
    load = ctx.streams(s.long_tokens)
    await faults.warm(load, s.warmup_s)
    victim, on_victim = faults.busiest(load.streaming_on(time.monotonic()), "server")
    ctx.figures.update(victim=victim, streams_on_victim=len(on_victim))
    t_kill = await faults.sigkill(mesh, victim)
    ctx.event(f"SIGKILL {victim} ({len(on_victim)} streams on it)")
    t_restart = time.monotonic()
    server_plan = next(p for p in mesh.plan.servers if p.server_id == victim)
    await asyncio.to_thread(mesh.start_server, server_plan, False)
    t_ok = await probes.until(lambda: probes.server_generates(mesh.servers[victim], MODEL), RESTART_TIMEOUT_S)
    ctx.event(f"{victim} restarted; serving after {_s(t_ok, t_restart)} s")
    ctx.figures.update(restart_to_serving_s=_s(t_ok, t_restart), kill_to_serving_s=_s(t_ok, t_kill))
    _restart_criterion(ctx, "model server", _s(t_ok, t_restart))

    async def in_traffic() -> bool:
        return any(seg.server == victim and seg.at > t_restart for r in load.records for seg in r.segments)

    t_traffic = await probes.until(in_traffic, 30.0)
    ctx.figures["restart_to_mesh_traffic_s"] = _s(t_traffic, t_restart)
    await _all_ended(on_victim, s.request_timeout_s)
    _victims_outcome(ctx, on_victim)
    await asyncio.sleep(s.after_s)


async def server_sigstop(ctx: PhaseContext) -> None:
    s, mesh = ctx.settings, ctx.mesh
    load = ctx.streams(s.long_tokens)
    await faults.warm(load, s.warmup_s)
    victim, on_victim = faults.busiest(load.streaming_on(time.monotonic()), "server")
    ctx.figures.update(victim=victim, streams_on_victim=len(on_victim), stopped_for_s=s.sigstop_s)
    t_stop = faults.send(mesh, victim, signal.SIGSTOP)
    ctx.event(f"SIGSTOP {victim} ({len(on_victim)} streams on it)")
    try:
        await asyncio.sleep(s.sigstop_s)
    finally:
        t_cont = faults.send(mesh, victim, signal.SIGCONT)
        ctx.event(f"SIGCONT {victim}")
    moved = {r.request_id: _continued(r, t_stop, victim) for r in on_victim}
    resume = [round(max(0.0, t - t_stop), 3) for t in moved.values() if t is not None]
    stuck = [r for r in on_victim if moved[r.request_id] is None]
    ctx.figures.update(
        resume_elsewhere_s=sorted(resume), resume_p50_s=round(pct(resume, 50), 3) if resume else None,
        resume_max_s=max(resume) if resume else None,
        not_resumed_elsewhere=[f"{r.request_id}: {r.error or 'no chunk from another server'}" for r in stuck])
    ok = not stuck and bool(resume) and max(resume) <= RESUME_WITHIN_S
    ctx.criterion("streams on the hung server continue elsewhere", f"all, each <= {RESUME_WITHIN_S:.0f} s",
                  f"{len(resume)}/{len(on_victim)}, max {max(resume) if resume else None} s", ok)
    hung_start = [r for r in load.records if t_stop <= r.started < t_stop + 5 and r.ttft is not None]
    ctx.figures["ttft_max_s_requests_started_first_5s_of_hang"] = (
        round(max(r.ttft or 0 for r in hung_start), 3) if hung_start else None)
    t_back = await probes.until(lambda: probes.server_generates(mesh.servers[victim], MODEL), 30.0)
    ctx.figures["cont_to_serving_s"] = _s(t_back, t_cont)

    async def whole() -> bool:
        return (await probes.ready_replicas(ctx.stub)).get(MODEL, 0) >= SERVERS

    ctx.figures["cont_to_ready_in_mesh_s"] = _s(await probes.until(whole, 60.0, 0.25), t_cont)
    _victims_outcome(ctx, on_victim)
    await asyncio.sleep(s.after_s)


async def router_sigkill(ctx: PhaseContext) -> None:
    s, mesh = ctx.settings, ctx.mesh
    load = ctx.streams(s.long_tokens)
    await faults.warm(load, s.warmup_s)
    victim, on_victim = faults.busiest(load.routed_by(time.monotonic()), "router")
    index = int(victim.removeprefix("router"))
    ctx.figures.update(victim=victim, streams_on_victim=len(on_victim))
    t_kill = await faults.sigkill(mesh, victim)
    ctx.event(f"SIGKILL {victim} ({len(on_victim)} streams through it)")
    t_restart = time.monotonic()
    restart = asyncio.create_task(asyncio.to_thread(mesh.start_router, index))
    t_ok = await probes.until(lambda: probes.router_generates(mesh.routers[index], MODEL), RESTART_TIMEOUT_S)
    try:
        await restart
    except Exception as exc:  # noqa: BLE001 - reported with the figures
        ctx.figures["restart_error"] = str(exc)
    ctx.event(f"{victim} restarted; serving after {_s(t_ok, t_restart)} s")
    ctx.figures.update(restart_to_serving_s=_s(t_ok, t_restart), kill_to_serving_s=_s(t_ok, t_kill))
    _restart_criterion(ctx, "router", _s(t_ok, t_restart))

    async def envoy_sees_all() -> bool:
        return await probes.envoy_healthy_routers(mesh.envoy_admin) >= ROUTERS

    ctx.figures["restart_to_envoy_healthy_s"] = _s(await probes.until(envoy_sees_all, 60.0, 0.25), t_restart)
    await _all_ended(on_victim, s.request_timeout_s)
    _victims_outcome(ctx, on_victim)
    resumed = ctx.figures["victim_streams_resumed_by_client"]
    ctx.criterion("streams through the killed router resumed by their clients and completed",
                  f"{len(on_victim)}", f"{ctx.figures['victim_streams_completed_exact']} completed, "
                  f"{resumed} resumed", ctx.figures["victim_streams_completed_exact"] == len(on_victim))
    await asyncio.sleep(s.after_s)
