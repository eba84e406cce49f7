"""Shared fixtures: real etcd members and the local mesh on free loopback ports.

Every process a fixture starts is stopped by PID when the fixture ends, even on failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from services.localmesh import components as c
from services.localmesh.mesh import LocalMesh, MeshPlan
from services.localmesh.processes import Child, Supervisor

os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05):
    """Poll a condition until it holds (never a blind sleep); fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - condition not met yet
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}"
                         + (f" (last error: {last_exc!r})" if last_exc else ""))


async def wait_for_async(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.02):
    """wait_for for tests running on an event loop: polls without blocking the loop."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        result = check()
        if result:
            return result
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class EtcdCluster:
    """1 or 3 real etcd members on loopback."""

    def __init__(self, root: Path, members: int = 1) -> None:
        self.sup = Supervisor(root / "logs")
        self.root = root
        self.clients = [f"127.0.0.1:{c.free_port()}" for _ in range(members)]
        self.peers = [f"127.0.0.1:{c.free_port()}" for _ in range(members)]
        self.names = [f"etcd{i}" for i in range(members)]
        self.children: dict[str, Child] = {}

    @property
    def endpoints(self) -> str:
        return ",".join(self.clients)

    def start_member(self, i: int) -> Child:
        name = self.names[i]
        cluster = dict(zip(self.names, self.peers))
        data = self.root / name
        child = self.sup.start(name, c.etcd_argv(name, data, self.clients[i], self.peers[i], cluster,
                                                 new_cluster=not (data / "member").exists()))
        self.children[name] = child
        return child

    def start(self) -> None:
        for i in range(len(self.names)):
            self.start_member(i)
        for i, client in enumerate(self.clients):
            self.sup.wait_ready(self.children[self.names[i]], lambda a=client: c.etcd_healthy(a), 30,
                                "healthy")

    def stop(self) -> None:
        self.sup.stop()


@pytest.fixture
def etcd(tmp_path):
    cluster = EtcdCluster(tmp_path / "etcd")
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def meshctl(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real meshctl CLI as an operator would."""
    return subprocess.run([sys.executable, "-m", "services.cli.meshctl", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


@contextlib.contextmanager
def running_mesh(plan: MeshPlan):
    """A started LocalMesh that is stopped afterwards, checking nothing it started survives."""
    mesh = LocalMesh(plan)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()
        for name, child in mesh.children.items():
            assert not child.alive(), f"{name} (pid {child.pid}) survived the mesh stop"
