"""Phases 4-7: the control plane and etcd fail, and a model is scaled, under streaming load.

4. SIGKILL of the control-plane leader; a deploy written during the outage completes.
5. SIGKILL of one etcd member (the raft leader), restarted on its data.
6. etcd quorum loss: SIGSTOP of 2 of 3 members, then SIGCONT.
7. A control-plane managed model scaled down and up every few seconds while requests for it
   (unary and streaming) flow.
"""

from __future__ import annotations

import asyncio
import signal
import time
from typing import Any

import grpc
from meshserve.v1 import controlplane_pb2 as cp

from . import faults, probes
from .config import RESTART_SERVING_WITHIN_S, SCALED, SERVERS
from .load import LoadSpec
from .meshsetup import controlplane
from .phase import PhaseContext

DEPLOYED = "chaos-deployed"  # deployed while the control-plane leader is dead
WRITE_RETRY_S = 10.0
MAX_OBSERVATIONS = 60


def _s(t: float | None, since: float) -> float | None:
    return None if t is None else round(t - since, 3)


async def _write(mesh: Any, index: int, call: str, request: Any) -> tuple[float | None, str]:
    """One control-plane write to replica `index`, retried on UNAVAILABLE for a few seconds as
    an operator's meshctl would: (seconds it took or None, error)."""
    t0 = time.monotonic()
    ch, ctl = controlplane(mesh, index)
    err = ""
    async with ch:
        while time.monotonic() - t0 < WRITE_RETRY_S:
            try:
                await getattr(ctl, call)(request, timeout=5)
                return round(time.monotonic() - t0, 3), ""
            except grpc.aio.AioRpcError as exc:
                err = f"{exc.code().name}: {exc.details()}"
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    break
                await asyncio.sleep(0.2)
    return None, err


async def controlplane_leader_sigkill(ctx: PhaseContext) -> None:
    s, mesh = ctx.settings, ctx.mesh
    load = ctx.streams(s.short_tokens)
    await faults.warm(load, s.warmup_s)
    record, _ = await probes.leader(mesh.controlplanes)
    victim = record.replica_id
    index = int(victim.removeprefix("controlplane"))
    other = next(i for i in range(len(mesh.controlplanes)) if i != index)
    kill_ms = int(time.time() * 1000)
    t_kill = await faults.sigkill(mesh, victim)
    ctx.event(f"SIGKILL control-plane leader {victim}")
    spec = cp.ModelSpec(name=DEPLOYED, backend="sim", replicas=1,
                        options={"tokens_per_second": str(s.tokens_per_second)})
    took, err = await _write(mesh, other, "DeployModel", cp.DeployModelRequest(spec=spec))
    t_write = time.monotonic()
    ctx.event(f"deploy of {DEPLOYED} written to controlplane{other}: {err or f'ok in {took} s'}")
    ctx.figures.update(victim=victim, deploy_write_s=took, deploy_write_error=err)
    t_restart = time.monotonic()
    restart = asyncio.create_task(asyncio.to_thread(mesh.start_controlplane, index))
    t_ok = await probes.until(lambda: probes.health_serving(mesh.controlplanes[index]), 60.0)
    try:
        await restart
    except Exception as exc:  # noqa: BLE001 - reported with the figures
        ctx.figures["restart_error"] = str(exc)

    async def new_term() -> bool:
        rec, _ = await probes.leader(mesh.controlplanes)
        return bool(rec.replica_id) and rec.since_ms > kill_ms

    async def deployed() -> bool:
        return (await probes.ready_replicas(ctx.stub)).get(DEPLOYED, 0) >= 1

    t_term = await probes.until(new_term, 60.0, 0.2)
    t_ready = await probes.until(deployed, 60.0, 0.25)
    ctx.figures.update(restart_to_serving_s=_s(t_ok, t_restart), kill_to_new_leader_s=_s(t_term, t_kill),
                       deploy_ready_after_write_s=_s(t_ready, t_write))
    if t_term is not None:
        ctx.figures["new_leader"] = (await probes.leader(mesh.controlplanes))[0].replica_id
    ctx.event(f"new leader after {_s(t_term, t_kill)} s; {DEPLOYED} ready {_s(t_ready, t_write)} s after the write")
    ctx.criterion("a deploy written during the outage completes", "ready",
                  "ready" if t_ready else f"not ready ({err or 'written'})", bool(t_ready) and not err)
    ctx.criterion("control plane restarted on its port serves again", f"<= {RESTART_SERVING_WITHIN_S:.0f} s",
                  _s(t_ok, t_restart), t_ok is not None and t_ok - t_restart <= RESTART_SERVING_WITHIN_S)
    await _write(mesh, other, "UndeployModel", cp.UndeployModelRequest(name=DEPLOYED))
    await asyncio.sleep(s.after_s)


async def etcd_member_sigkill(ctx: PhaseContext) -> None:
    s, mesh = ctx.settings, ctx.mesh
    load = ctx.streams(s.short_tokens)
    await faults.warm(load, s.warmup_s)
    leader = await probes.etcd_leader_index(mesh.etcd_clients)
    i = 0 if leader is None else leader
    name = f"etcd{i}"
    ctx.figures.update(victim=name, was_raft_leader=leader is not None)
    await faults.sigkill(mesh, name)
    ctx.event(f"SIGKILL {name} (raft leader: {leader is not None})")
    took, err = await _write(mesh, 0, "ScaleModel", cp.ScaleModelRequest(name=SCALED, replicas=SERVERS))
    ctx.figures.update(write_during_outage_s=took, write_during_outage_error=err)
    ctx.criterion("a control-plane write while the member is down", "succeeds", err or f"ok in {took} s",
                  not err)
    await asyncio.sleep(s.etcd_down_s)
    t_restart = time.monotonic()
    await asyncio.to_thread(mesh.restart_etcd_member, i)
    t_ok = await probes.until(lambda: probes.etcd_healthy(mesh.etcd_clients[i]), 60.0)
    ctx.event(f"{name} restarted; healthy after {_s(t_ok, t_restart)} s")
    ctx.figures["restart_to_healthy_s"] = _s(t_ok, t_restart)
    ctx.criterion("etcd member restarted on its port serves again", f"<= {RESTART_SERVING_WITHIN_S:.0f} s",
                  _s(t_ok, t_restart), t_ok is not None and t_ok - t_restart <= RESTART_SERVING_WITHIN_S)
    await asyncio.sleep(s.after_s)


async def _observe_status(ctx: PhaseContext, seen: list[dict[str, Any]]) -> None:
    """What the control planes say while etcd has no quorum (issue 8 item 11: degraded, leader);
    runs until cancelled."""
    while len(seen) < MAX_OBSERVATIONS:
        for i, address in enumerate(ctx.mesh.controlplanes):
            obs: dict[str, Any] = {"t": round(time.monotonic() - ctx.t0, 1), "controlplane": i,
                                   "error": "no answer before the quorum came back"}
            seen.append(obs)
            try:
                st = await probes.cluster_status(address)
                del obs["error"]
                obs.update(degraded=st.degraded, leader=st.leader.replica_id)
            except grpc.aio.AioRpcError as exc:
                obs["error"] = exc.code().name
        await asyncio.sleep(2.0)


async def etcd_quorum_loss(ctx: PhaseContext) -> None:
    s, mesh = ctx.settings, ctx.mesh
    load = ctx.streams(s.short_tokens)
    await faults.warm(load, s.warmup_s)
    leader = await probes.etcd_leader_index(mesh.etcd_clients)
    first = 0 if leader is None else leader
    victims = [f"etcd{first}", f"etcd{(first + 1) % len(mesh.etcd_clients)}"]
    ctx.figures.update(victims=victims, stopped_for_s=s.quorum_loss_s)
    obs: list[dict[str, Any]] = []
    ctx.figures["controlplane_status_during"] = obs
    t_stop = time.monotonic()
    try:
        for v in victims:
            faults.send(mesh, v, signal.SIGSTOP)
        ctx.event(f"SIGSTOP {', '.join(victims)}: no quorum")
        observer = asyncio.create_task(_observe_status(ctx, obs))
        await asyncio.sleep(max(0.0, t_stop + s.quorum_loss_s - time.monotonic()))
        observer.cancel()
        await asyncio.gather(observer, return_exceptions=True)
    finally:
        for v in victims:
            faults.send(mesh, v, signal.SIGCONT)
    t_cont = time.monotonic()
    ctx.event(f"SIGCONT {', '.join(victims)}")
    ctx.figures["degraded_reported"] = any(o.get("degraded") for o in obs)
    ctx.figures["controlplane_answers_during"] = (f"{sum('error' not in o for o in obs)} of {len(obs)} "
                                                  "GetClusterStatus calls answered")

    async def quorum() -> bool:
        return all([await probes.etcd_healthy(cl) for cl in mesh.etcd_clients])

    ctx.figures["cont_to_quorum_s"] = _s(await probes.until(quorum, 60.0, 0.2), t_cont)
    await asyncio.sleep(s.after_s)


async def scale_under_load(ctx: PhaseContext) -> None:
    s, mesh = ctx.settings, ctx.mesh
    spec = LoadSpec(SCALED, s.concurrency, s.scale_tokens, unary_workers=s.concurrency // 2,
                    timeout_s=s.request_timeout_s, stagger_s=s.answer_s(s.scale_tokens))
    ctx.start_load(spec, "p7")
    await asyncio.sleep(s.warmup_s)
    ops: list[dict[str, Any]] = []
    t0 = time.monotonic()
    step = 0
    while time.monotonic() - t0 < s.scale_for_s:
        replicas = SERVERS - 1 if step % 2 == 0 else SERVERS
        took, err = await _write(mesh, step % len(mesh.controlplanes), "ScaleModel",
                                 cp.ScaleModelRequest(name=SCALED, replicas=replicas))
        ready = (await probes.ready_replicas(ctx.stub)).get(SCALED, 0)
        ops.append({"t": round(time.monotonic() - ctx.t0, 1), "replicas": replicas, "write_s": took,
                    "error": err, "ready_before_next": None, "ready_at_write": ready})
        step += 1
        await asyncio.sleep(max(0.0, t0 + step * s.scale_every_s - time.monotonic()))
        ops[-1]["ready_before_next"] = (await probes.ready_replicas(ctx.stub)).get(SCALED, 0)
    took, err = await _write(mesh, 0, "ScaleModel", cp.ScaleModelRequest(name=SCALED, replicas=SERVERS))
    ctx.event(f"{len(ops)} scale operations; back to {SERVERS} replicas ({err or 'ok'})")

    async def whole() -> bool:
        return (await probes.ready_replicas(ctx.stub)).get(SCALED, 0) >= SERVERS

    t_back = time.monotonic()
    ctx.figures["scale_steps"] = ", ".join(f"want {o['replicas']} (ready {o['ready_at_write']} -> "
                                           f"{o['ready_before_next']})" for o in ops)
    ctx.figures.update(scale_ops=ops, scale_errors=[o["error"] for o in ops if o["error"]],
                       back_to_full_s=_s(await probes.until(whole, 60.0, 0.25), t_back))
    ctx.criterion("every scale write accepted", "all", f"{sum(not o['error'] for o in ops)}/{len(ops)}",
                  all(not o["error"] for o in ops) and not err)
    await asyncio.sleep(s.after_s)
