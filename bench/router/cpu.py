"""CPU time per request of every process on the path (load generator, Envoy, router, model
server) at one open-loop rate, on the overhead benchmark's mesh; optionally a py-spy profile
of the router meanwhile.

`python -m bench.router.cpu [--rate 200] [--seconds 5] [--paths direct,router,envoy]
[--profile FILE]`: FILE gets py-spy's collapsed stacks ("frame;frame;... count" per line).
Results are printed, not saved: this is a tool for profiling, the overhead benchmark records.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import running_mesh

from .common import mesh_cpu_meter, open_loop, pct, progress
from .overhead import MODEL, SIM, Clients


def _py_spy(pid: int, seconds: float, out: str) -> subprocess.Popen:
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("py-spy")), "record", "--pid", str(pid),
         "--format", "raw", "--rate", "250", "--nonblocking", "--duration",
         str(max(1, round(seconds))), "-o", out],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _measure(mesh, rate: float, seconds: float, paths: list[str],
                   profile: str | None) -> dict:
    clients = Clients(mesh)
    cpu = mesh_cpu_meter(mesh)
    out = {}
    try:
        for path in paths:
            await open_loop(50, 1.0, clients.caller(path))  # warm connections and code paths
        for path in paths:
            spy = _py_spy(cpu.pids["router"], seconds, profile) if (
                profile and path == "router") else None
            before = cpu.snapshot()
            lat, failed, achieved = await open_loop(rate, seconds, clients.caller(path))
            row = cpu.ms_per_request(before, len(lat) + failed)
            if spy is not None:
                spy.wait(timeout=60)
            row.update(p50_ms=round(pct(lat, 50) * 1e3, 2), p99_ms=round(pct(lat, 99) * 1e3, 2),
                       failed=failed, achieved_rps=round(achieved, 1))
            out[path] = row
            progress(f"cpu {rate:g}/s {path}: CPU ms per request {row}")
    finally:
        await clients.close()
    return out


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.router.cpu", description=__doc__)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--paths", default="direct,router,envoy")
    ap.add_argument("--profile", default=None, help="write py-spy stacks of the router here")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        plan = MeshPlan(data_dir=Path(tmp), base_port=0, lease_ttl=5,
                        servers=[ServerPlan("server-0", [f"{MODEL}=sim"], engine_options=SIM)])
        with running_mesh(plan) as mesh:
            result = asyncio.run(_measure(mesh, args.rate, args.seconds,
                                          args.paths.split(","), args.profile))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
