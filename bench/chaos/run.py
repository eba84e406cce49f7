"""`python -m bench.chaos.run [--smoke] [--phases 1,2,...]`: the chaos benchmark of issue 8.

One mesh of real processes, eight phases under checked load, results in bench/results/chaos.json
and chaos.md (chaos-smoke.* for a smoke run, chaos-partial.* for a subset of phases). Every
process the run starts is stopped by PID at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc
from meshserve.v1 import inference_pb2_grpc

from services.localmesh.mesh import LocalMesh

from . import phase_slow, phases_control, phases_data
from .config import FULL, SMOKE, Settings
from .meshsetup import deploy_managed, plan, release_all, restore
from .phase import PhaseContext, progress, run_phase
from .report import markdown

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
LOGS = ROOT / "bench" / ".chaos-logs"  # the last run's mesh logs (git-ignored)

Body = Callable[[PhaseContext], Awaitable[None]]
PHASES: list[tuple[int, str, str, Body]] = [
    (1, "server-sigkill", "SIGKILL of a model server with 300-token streams, restart",
     phases_data.server_sigkill),
    (2, "server-sigstop", "SIGSTOP of a model server, SIGCONT", phases_data.server_sigstop),
    (3, "router-sigkill", "SIGKILL of a router (clients resume), restart", phases_data.router_sigkill),
    (4, "controlplane-leader-sigkill", "SIGKILL of the control-plane leader, restart",
     phases_control.controlplane_leader_sigkill),
    (5, "etcd-member-sigkill", "SIGKILL of one etcd member, restart", phases_control.etcd_member_sigkill),
    (6, "etcd-quorum-loss", "etcd quorum loss (2 of 3 members stopped)", phases_control.etcd_quorum_loss),
    (7, "scale-up-down", "scaling a managed model 3 -> 2 -> 3 under load", phases_control.scale_under_load),
    (8, "non-readers", "100 streams that never read", phase_slow.nonreaders),
]


def _noise(cpus: int, before: tuple[float, float, float]) -> tuple[bool, str]:
    """Noisy: other work already kept every core busy before the mesh started."""
    if before[0] >= cpus:
        return True, f"1-minute load average {before[0]:.2f} >= {cpus} CPUs before the benchmark started"
    return False, ""


def _tracebacks(log_dir: Path) -> dict[str, int]:
    out = {}
    for path in sorted(log_dir.glob("*.log")):
        n = path.read_text(errors="replace").count("Traceback (most recent call last)")
        if n:
            out[path.stem] = n
    return out


async def _phases(mesh: LocalMesh, s: Settings, chosen: list[int]) -> list[dict[str, Any]]:
    await deploy_managed(mesh, s)
    results = []
    async with grpc.aio.insecure_channel(mesh.envoy) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        took, left = await restore(mesh, stub, s.restore_timeout_s)
        progress(f"mesh whole after {took} s" if took is not None else f"mesh NOT whole: {left}")
        for number, name, title, body in PHASES:
            if number in chosen:
                ctx = PhaseContext(number, mesh, stub, s)
                results.append(await run_phase(ctx, name, title, body))
    return results


async def run(s: Settings, chosen: list[int]) -> dict[str, Any]:
    cpus = os.cpu_count() or 1
    before = os.getloadavg()
    noisy, why = _noise(cpus, before)
    start = time.monotonic()
    results: list[dict[str, Any]] = []
    error = ""
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as tmp:
        mesh = LocalMesh(plan(Path(tmp), s))
        try:
            progress(f"starting the mesh in {tmp} (load average {before[0]:.2f} on {cpus} CPUs)")
            await asyncio.to_thread(mesh.start)
            results = await _phases(mesh, s, chosen)
        except Exception as exc:  # noqa: BLE001 - recorded in the results as a failed run
            error = f"{type(exc).__name__}: {exc}"
            progress(f"run aborted: {error}")
        finally:
            await asyncio.to_thread(release_all, mesh)
            survivors = [n for n, ch in mesh.children.items() if ch.alive()]
            tracebacks = _tracebacks(mesh.sup.log_dir)
            shutil.rmtree(LOGS, ignore_errors=True)
            shutil.copytree(mesh.sup.log_dir, LOGS)
            progress(f"mesh stopped{' - STILL ALIVE: ' + ', '.join(survivors) if survivors else ''}; "
                     f"logs in {LOGS}")
    return {
        "machine": {"cpus": cpus, "loadavg_before": [round(x, 2) for x in before],
                    "loadavg_after": [round(x, 2) for x in os.getloadavg()], "noisy": noisy,
                    "noisy_reason": why},
        "engine": "sim (simulated; not a model)", "settings": asdict(s), "phases_run": chosen,
        "phases": results, "error": error, "passed": not error and all(p["passed"] for p in results)
        and len(results) == len(chosen) and not survivors,
        "processes_left_running": survivors, "log_tracebacks": tracebacks,
        "seconds": round(time.monotonic() - start, 1), "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _clean(x: Any) -> Any:
    """JSON without NaN (figures that could not be measured are null)."""
    if isinstance(x, float) and x != x:
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_clean(v) for v in x]
    return x


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--smoke", action="store_true", default=os.environ.get("CHAOS_SMOKE") == "1",
                   help="short phases and less load (also CHAOS_SMOKE=1)")
    p.add_argument("--phases", default="", help="comma-separated phase numbers (default: all)")
    args = p.parse_args(argv)
    chosen = sorted({int(x) for x in args.phases.split(",") if x.strip()}) or [n for n, *_ in PHASES]
    s = SMOKE if args.smoke else FULL
    stem = "chaos-smoke" if args.smoke else ("chaos" if len(chosen) == len(PHASES) else "chaos-partial")
    data = _clean(asyncio.run(run(s, chosen)))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{stem}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (RESULTS / f"{stem}.md").write_text(markdown(data))
    progress(f"results in {RESULTS / stem}.json and .md: {'PASS' if data['passed'] else 'FAIL'}")
    print((RESULTS / f"{stem}.md").read_text())
    return 0 if data["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
