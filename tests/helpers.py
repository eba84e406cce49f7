"""What tests share besides fixtures: waiting on conditions (never blind sleeps), real etcd
members, the meshctl CLI, a started local mesh, HTTP helpers and request builders.

Fixtures stay in tests/conftest.py, which re-exports `wait_for`, `EtcdCluster`, `meshctl` and
`running_mesh` for tests that import them from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from http.client import HTTPResponse
from pathlib import Path
from typing import Any, TypeVar

from meshserve.v1 import inference_pb2
from prometheus_client import REGISTRY

from services.localmesh import components as c
from services.localmesh.mesh import LocalMesh, MeshPlan
from services.localmesh.processes import Child, Supervisor

REPO = Path(__file__).resolve().parents[1]
T = TypeVar("T")


# --- waiting on conditions ---------------------------------------------------------------------

def wait_for(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.05) -> T:
    """Poll `check` until it returns something truthy and return that; fail naming `what` on
    timeout. An exception from `check` counts as "not yet" (and is shown on timeout)."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
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


async def eventually(check: Callable[[], object], timeout: float, interval: float = 0.01) -> bool:
    """Whether `check` holds within `timeout` (polled on the running loop). For conditions that
    have no event to wait on: another object's state, or "this must NOT happen within t"."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if check():
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(interval)


async def until(check: Callable[[], object], timeout: float = 15.0, what: str = "condition",
                interval: float = 0.05) -> None:
    """Wait (on the running loop) until `check` holds; fail naming `what` on timeout."""
    if not await eventually(check, timeout, interval):
        raise AssertionError(f"timed out after {timeout}s waiting for {what}")


async def retry(call: Callable[[], Awaitable[T]], attempts: int = 50, delay: float = 0.1) -> T:
    """Await `call()` until it succeeds (e.g. a client whose channel is still backing off)."""
    for _ in range(attempts - 1):
        try:
            return await call()
        except Exception:  # noqa: BLE001 - not yet: try again
            await asyncio.sleep(delay)
    return await call()


# --- real processes ----------------------------------------------------------------------------

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
        cluster = dict(zip(self.names, self.peers, strict=True))
        data = self.root / name
        child = self.sup.start(name, c.etcd_argv(name, data, self.clients[i], self.peers[i], cluster,
                                                 new_cluster=not (data / "member").exists()))
        self.children[name] = child
        return child

    def start(self) -> None:
        for i in range(len(self.names)):
            self.start_member(i)
        for i, client in enumerate(self.clients):
            self.sup.wait_ready(self.children[self.names[i]], functools.partial(c.etcd_healthy, client),
                                30, "healthy")

    def healthy(self, i: int = 0) -> bool:
        """Whether member i answers its /health endpoint with a healthy verdict."""
        try:
            return c.etcd_healthy(self.clients[i])
        except (OSError, ValueError):  # not listening yet, or a half-written answer
            return False

    def stop(self) -> None:
        self.sup.stop()


def meshctl(*args: str, timeout: float = 60, certs: Path | None = None,
            cert_name: str = "operator") -> subprocess.CompletedProcess[str]:
    """Run the real meshctl CLI as an operator would: with the certificate `cert_name` from
    `certs` (a secure mesh's `certs_dir`), else in plaintext (a mesh started --insecure-dev)."""
    env = {**os.environ, "MESHSERVE_CERTS": str(certs or ""), "MESHSERVE_CERT_NAME": cert_name,
           "MESHSERVE_INSECURE_DEV": "" if certs else "1"}
    return subprocess.run([sys.executable, "-m", "services.cli.meshctl", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


@contextlib.contextmanager
def running_mesh(plan: MeshPlan) -> Iterator[LocalMesh]:
    """A started LocalMesh that is stopped afterwards, checking nothing it started survives."""
    mesh = LocalMesh(plan)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.stop()
        for name, child in mesh.children.items():
            assert not child.alive(), f"{name} (pid {child.pid}) survived the mesh stop"


# --- HTTP ----------------------------------------------------------------------------------------

def post_json(address: str, path: str, body: dict[str, Any], timeout: float = 30) -> HTTPResponse:
    """POST a JSON body (e.g. to Envoy's transcoded API); HTTP errors raise urllib's HTTPError."""
    req = urllib.request.Request(f"http://{address}{path}", data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"}, method="POST")
    response: HTTPResponse = urllib.request.urlopen(req, timeout=timeout)
    return response


def metrics_text(address: str, timeout: float = 10) -> str:
    """A process's Prometheus /metrics page."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as resp:
        text: str = resp.read().decode()
    return text


def sample(name: str, **labels: str) -> float:
    """A Prometheus sample of this process's default registry (0 where it was never set)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


# --- requests and what the sim engine answers ----------------------------------------------------

def ask(prompt: str = "one two three", max_tokens: int = 2, *, model: str = "echo",
        **fields: Any) -> inference_pb2.GenerateRequest:
    """A plain-prompt GenerateRequest; `fields` are further GenerateRequest fields."""
    req = inference_pb2.GenerateRequest(model=model, prompt=prompt, **fields)
    req.sampling.max_tokens = max_tokens
    return req


def chat(text: str, *, model: str, system: str | None = None, max_tokens: int = 16,
         temperature: float | None = None) -> inference_pb2.GenerateRequest:
    """A chat GenerateRequest: an optional system message, then one user message."""
    req = inference_pb2.GenerateRequest(model=model)
    if system:
        req.messages.add(role="system", content=system)
    req.messages.add(role="user", content=text)
    req.sampling.max_tokens = max_tokens
    if temperature is not None:
        req.sampling.temperature = temperature
    return req


def sim_text(prompt: str, n: int) -> str:
    """The sim engine's answer of n tokens: the prompt's words repeated, space-separated."""
    words = prompt.split()
    return " ".join(words[i % len(words)] for i in range(n))
