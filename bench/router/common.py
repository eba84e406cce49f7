"""Shared bench plumbing: a mesh on free loopback ports, open-loop load, percentiles, results."""

from __future__ import annotations

import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from services.localmesh import components as c
from services.localmesh.mesh import LocalMesh

RESULTS = Path(__file__).resolve().parents[1] / "results"


def progress(msg: str) -> None:
    print(f"[bench-router {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


async def open_loop(rate: float, seconds: float, one: Callable[[], Awaitable[None]]
                    ) -> tuple[list[float], int, float]:
    """Send at a fixed rate regardless of answers (no coordinated omission): latency counts from
    the scheduled send time. Returns (latencies of successes, failures, achieved rate)."""
    lat: list[float] = []
    failed = 0
    n = int(rate * seconds)
    start = time.perf_counter()

    async def run(scheduled: float) -> None:
        nonlocal failed
        try:
            await one()
            lat.append(time.perf_counter() - scheduled)
        except Exception:  # noqa: BLE001 - counted, the bench goes on
            failed += 1

    tasks = []
    for i in range(n):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(run(scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    return lat, failed, len(lat) / elapsed if elapsed else 0.0


class CpuMeter:
    """CPU time (user + system, every thread) that named processes spend, from /proc: on shared
    cores every process on the path competes, so each one's cost per request matters."""

    _TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids

    @classmethod
    def seconds(cls, pid: int) -> float:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / cls._TICK

    def snapshot(self) -> dict[str, float]:
        return {name: self.seconds(pid) for name, pid in self.pids.items()}

    def since(self, before: dict[str, float]) -> dict[str, float]:
        """CPU seconds each process used since the `before` snapshot."""
        after = self.snapshot()
        return {name: after[name] - before[name] for name in self.pids}

    def ms_per_request(self, before: dict[str, float], requests: int) -> dict[str, float]:
        return {name: round(s * 1e3 / max(1, requests), 3)
                for name, s in self.since(before).items()}


def mesh_cpu_meter(mesh, router: str = "router0", server: str = "server-0") -> CpuMeter:
    """The load generator (this process), Envoy, one router and one model server."""
    return CpuMeter({"loadgen": os.getpid(), "envoy": mesh.children["envoy"].pid,
                     "router": mesh.children[router].pid, "server": mesh.children[server].pid})


def start_router(mesh: LocalMesh, name: str, *flags: str) -> str:
    """An extra router process (e.g. with another --policy) on a free port; returns its address."""
    address = f"127.0.0.1:{c.free_port()}"
    child = mesh.sup.start(name, c.service_argv(
        "router", "--id", name, "--listen", address, "--etcd", mesh.etcd_endpoints,
        "--metrics", "", "--lease-ttl", str(mesh.plan.lease_ttl), *mesh.security_args(), *flags))
    mesh.children[name] = child
    mesh.sup.wait_ready(child, lambda: mesh.serving(address), 60, "serving")
    return address


def save(section: str, value: object) -> dict:
    """Merge one section into bench/results/router.json and rewrite router.md."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "router.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    data[section] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    from .report import markdown
    (RESULTS / "router.md").write_text(markdown(data))
    return data
