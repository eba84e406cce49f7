"""Injecting faults into the mesh's children by PID, and picking the victim that hurts most."""

from __future__ import annotations

import asyncio
import signal
import time

from services.localmesh.mesh import LocalMesh

from .load import Load
from .record import Record


async def sigkill(mesh: LocalMesh, name: str) -> float:
    """SIGKILL one child and reap it; returns the moment the signal was sent."""
    t = time.monotonic()
    await asyncio.to_thread(mesh.sup.kill, mesh.children[name])
    return t


def send(mesh: LocalMesh, name: str, sig: signal.Signals) -> float:
    """SIGSTOP / SIGCONT one child (by its own PID); returns the moment."""
    child = mesh.children[name]
    t = time.monotonic()
    if child.alive() and child.proc is not None:
        child.proc.send_signal(sig)
    return t


async def warm(load: Load, seconds: float, share: float = 0.75, timeout: float = 30.0) -> None:
    """Run the load `seconds`, then until `share` of its workers are mid-stream (bounded), so a
    fault lands on streams that are partly delivered."""
    await asyncio.sleep(seconds)
    deadline = time.monotonic() + timeout
    want = max(1, int(load.spec.concurrency * share))
    while time.monotonic() < deadline:
        streaming = load.streaming_on(time.monotonic())
        if sum(len(v) for v in streaming.values()) >= want:
            return
        await asyncio.sleep(0.1)


def busiest(groups: dict[str, list[Record]], what: str) -> tuple[str, list[Record]]:
    """The server (or router) streaming the most requests right now."""
    if not groups:
        raise RuntimeError(f"no stream in flight on any {what}: the load is not flowing")
    name = max(sorted(groups), key=lambda k: len(groups[k]))
    return name, groups[name]
