"""The mesh under test: real processes through LocalMesh (3-member etcd, 2 control planes,
3 sim model servers, 2 routers, Envoy), its control-plane managed models, and the check that it
is whole again after a phase."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan

from . import probes
from .config import CONTROLPLANES, ETCD_MEMBERS, MODEL, QUIET, ROUTERS, SCALED, SERVERS, Settings


def plan(data_dir: Path, s: Settings) -> MeshPlan:
    """Every server pins the sim model at the benchmark's pace; defaults everywhere else (lease
    TTL, hang and stall timeouts), as an operator would run the mesh."""
    opts = [f"tokens_per_second={s.tokens_per_second}"]
    return MeshPlan(data_dir=data_dir, base_port=0, routers=ROUTERS, controlplanes=CONTROLPLANES,
                    etcd_members=ETCD_MEMBERS,
                    servers=[ServerPlan(f"server-{i}", [f"{MODEL}=sim"], engine_options=opts)
                             for i in range(SERVERS)])


def managed_specs(s: Settings) -> list[cp.ModelSpec]:
    """Models the control plane places: one scaled under load, one for the non-reading clients
    (its own engine slots, so paused streams never take the readers' slots)."""
    quiet = {"tokens_per_second": str(s.nonreader_tokens_per_second), "max_running": "128",
             "max_context": str(s.nonreader_tokens + 64)}
    return [cp.ModelSpec(name=SCALED, backend="sim", replicas=SERVERS,
                         options={"tokens_per_second": str(s.tokens_per_second)}),
            cp.ModelSpec(name=QUIET, backend="sim", replicas=SERVERS, options=quiet)]


def controlplane(mesh: LocalMesh, i: int = 0) -> tuple[grpc.aio.Channel, Any]:
    ch = grpc.aio.insecure_channel(mesh.controlplanes[i])
    return ch, controlplane_pb2_grpc.ControlPlaneServiceStub(ch)


async def deploy_managed(mesh: LocalMesh, s: Settings) -> None:
    ch, ctl = controlplane(mesh)
    async with ch:
        for spec in managed_specs(s):
            await ctl.DeployModel(cp.DeployModelRequest(spec=spec), timeout=15)


def wanted_ready() -> dict[str, int]:
    return {MODEL: SERVERS, SCALED: SERVERS, QUIET: SERVERS}


async def missing(mesh: LocalMesh, stub: Any) -> list[str]:
    """What keeps the mesh from being whole (empty: whole)."""
    out = [f"{name} not running" for name, ch in mesh.children.items() if not ch.alive()]
    try:
        ready = await probes.ready_replicas(stub)
        out += [f"{m}: {ready.get(m, 0)}/{n} ready" for m, n in wanted_ready().items() if ready.get(m, 0) < n]
    except grpc.aio.AioRpcError as exc:
        out.append(f"ListModels through Envoy failed: {exc.code().name} {exc.details()}")
    try:
        healthy = await probes.envoy_healthy_routers(mesh.envoy_admin)
        if healthy < ROUTERS:
            out.append(f"Envoy sees {healthy}/{ROUTERS} healthy routers")
    except OSError as exc:
        out.append(f"Envoy admin: {exc}")
    try:
        record, _ = await probes.leader(mesh.controlplanes)
        if not record.replica_id:
            out.append("no control-plane leader")
    except RuntimeError as exc:
        out.append(str(exc))
    for client in mesh.etcd_clients:
        try:
            if not await probes.etcd_healthy(client):
                out.append(f"etcd {client} unhealthy")
        except OSError as exc:
            out.append(f"etcd {client}: {exc}")
    return out


async def restore(mesh: LocalMesh, stub: Any, timeout: float) -> tuple[float | None, list[str]]:
    """Wait until the mesh is whole: (seconds it took or None, what was still missing)."""
    start = time.monotonic()
    left: list[str] = []
    while time.monotonic() - start < timeout:
        left = await missing(mesh, stub)
        if not left:
            return round(time.monotonic() - start, 2), []
        await asyncio.sleep(0.5)
    return None, left


def stopped(pid: int) -> bool:
    """The process is stopped (SIGSTOP): state T in /proc."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False


def _restart(mesh: LocalMesh, name: str) -> None:
    index = int("".join(ch for ch in name if ch.isdigit()) or 0)
    if name in mesh.servers:
        mesh.start_server(next(p for p in mesh.plan.servers if p.server_id == name))
    elif name.startswith("router"):
        mesh.start_router(index)
    elif name.startswith("controlplane"):
        mesh.start_controlplane(index)
    elif name.startswith("etcd"):
        mesh.restart_etcd_member(index)
    elif name == "envoy":
        mesh.start_envoy()


async def repair(mesh: LocalMesh) -> list[str]:
    """Continue stopped children and restart dead ones, so a failed phase does not spoil the
    next; what had to be done is reported (a phase should leave nothing to repair)."""
    done: list[str] = []
    for name, child in list(mesh.children.items()):
        if child.alive() and child.pid is not None and stopped(child.pid):
            os.kill(child.pid, signal.SIGCONT)
            done.append(f"continued {name}")
        elif not child.alive():
            try:
                await asyncio.to_thread(_restart, mesh, name)
                done.append(f"restarted {name}")
            except Exception as exc:  # noqa: BLE001 - reported; the next phase shows the damage
                done.append(f"could not restart {name}: {exc}")
    return done


def release_all(mesh: LocalMesh) -> None:
    """SIGCONT every child (one may be stopped by a phase that failed) and stop the mesh by PID."""
    for child in mesh.children.values():
        if child.alive() and child.proc is not None:
            child.proc.send_signal(signal.SIGCONT)
    mesh.stop()
