"""`make bench-async` (issue 11): durability under faults, coexistence with interactive traffic,
cancel latency and queue throughput; writes bench/results/async.{json,md}.

`ARGS=--smoke` runs every part small (async-smoke.*), `ARGS="--parts queue,cancel"` a subset
(async-partial.*).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import running_mesh

from . import cancel, coexist, durability, queues
from .common import deploy, loadavg, progress, wait_ready
from .report import markdown

RESULTS = Path(__file__).resolve().parents[1] / "results"
PARTS = ("queue", "durability", "cancel", "coexist")


def _sim_mesh(root: Path) -> MeshPlan:
    return MeshPlan(data_dir=root, base_port=0, lease_ttl=3, routers=2, jetstream_nodes=3, job_workers=3,
                    servers=[ServerPlan(f"server-{i}", zone=f"local-{'ab'[i]}") for i in range(2)],
                    job_worker_args=["--ack-wait", "5", "--fill", "0.75"])


def _durable_parts(root: Path, args: argparse.Namespace, out: dict) -> None:
    with running_mesh(_sim_mesh(root)) as mesh:
        deploy(mesh, durability.MODEL, "sim", 2, {"max_running": "32", "tokens_per_second": "300"})
        wait_ready(mesh, durability.MODEL, 2, 60)
        if "durability" in args.parts:
            progress(f"durability: {args.lines} lines, no faults ...")
            clean = durability.run_batch(mesh, args.lines, faults=False, timeout_s=1800)
            progress(f"durability: clean run {clean['seconds']} s; now with faults ...")
            faulty = durability.run_batch(mesh, args.lines, faults=True, timeout_s=1800)
            progress(f"durability: faulty run {faulty['seconds']} s, lost {faulty['lost']}, "
                     f"duplicates {faulty['duplicates']}")
            out["durability"] = {"no_faults": clean, "with_faults": faulty,
                                 "slowdown": round(faulty["seconds"] / clean["seconds"], 3)}
            durability.restore(mesh)
        if "cancel" in args.parts:
            out["cancel"] = cancel.run(mesh, jobs=args.cancel_jobs)


def _coexist_part(root: Path, args: argparse.Namespace) -> dict:
    plan = MeshPlan(data_dir=root, base_port=0, lease_ttl=5, load_timeout_s=600, jetstream_nodes=1, job_workers=1,
                    servers=[ServerPlan(f"server-{i}", engine_options=["threads=1"]) for i in range(2)],
                    job_worker_args=["--fill", "0.5", "--max-in-flight", "4"])
    with running_mesh(plan) as mesh:
        deploy(mesh, coexist.MODEL, "torch", 2, {"threads": "1"}, source="embedded")
        progress("coexist: loading SmolLM2 on 2 torch servers ...")
        halts = wait_ready(mesh, coexist.MODEL, 2, 600)
        return {**coexist.run(mesh, args.rate, args.window, args.batch_lines, args.rounds), "load_halts_retried": halts}


def main() -> None:
    p = argparse.ArgumentParser(prog="bench-async")
    p.add_argument("--smoke", action="store_true", help="every part, small")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    args = p.parse_args()
    args.parts = [x for x in args.parts.split(",") if x]
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        p.error(f"unknown parts {sorted(unknown)}")
    args.lines, args.cancel_jobs, args.queue_jobs = (300, 24, 300) if args.smoke else (5000, 36, 3000)
    args.rate, args.window, args.batch_lines, args.rounds = (0.5, 15.0, 60, 2) if args.smoke else (1.0, 45.0, 300, 3)
    name = "async-smoke" if args.smoke else "async" if set(args.parts) == set(PARTS) else "async-partial"
    out: dict = {"machine": {"cpus": os.cpu_count(), "loadavg_before": loadavg()},
                 "started": time.strftime("%Y-%m-%d %H:%M:%S"), "parts": args.parts, "smoke": args.smoke}
    with tempfile.TemporaryDirectory(prefix="bench-async-") as tmp:
        root = Path(tmp)
        if "queue" in args.parts:
            _part(out, "queue", lambda: queues.run(root / "queue", args.queue_jobs, workers=16))
        if {"durability", "cancel"} & set(args.parts):
            _part(out, "durability+cancel", lambda: _durable_parts(root / "sim", args, out))
        if "coexist" in args.parts:
            _part(out, "coexist", lambda: _coexist_part(root / "torch", args))
    out["machine"]["loadavg_after"] = loadavg()
    out["summary"] = summary(out)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text(markdown(out))
    progress(f"wrote {RESULTS / name}.json and .md: {out['summary']}")


def _part(out: dict, name: str, run: Callable[[], object]) -> None:
    """Run one part; a part that fails is recorded with its error and the others still run."""
    try:
        result = run()
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the run goes on
        progress(f"{name} failed: {exc!r}")
        out.setdefault("errors", {})[name] = repr(exc)
        return
    if result is not None:
        out[name] = result


def summary(out: dict) -> dict:
    """The figures issue 11 names, at the top level of async.json."""
    s: dict = {}
    d = out.get("durability", {}).get("with_faults") if isinstance(out.get("durability"), dict) else None
    if d:
        s.update(lost=d["lost"], duplicates=d["duplicates"], completed_fraction=d["completed_fraction"],
                 durability_seconds_with_faults=d["seconds"],
                 durability_seconds_no_faults=out["durability"]["no_faults"]["seconds"])
    if "coexist" in out:
        s.update(interactive_ttft_p99_ratio=out["coexist"]["interactive_ttft_p99_ratio"],
                 batch_tokens_per_s=out["coexist"]["batch_tokens_per_s"])
    if "cancel" in out:
        s.update(cancel_p99_s=out["cancel"]["cancel_p99_s"])
    if "queue" in out:
        s.update(jetstream_jobs_per_s=out["queue"]["jetstream"]["jobs_per_s"],
                 etcd_jobs_per_s=out["queue"]["etcd"]["jobs_per_s"])
    if d:
        s.update(batch_lines_per_s_sim=round(d["lines"] / out["durability"]["no_faults"]["seconds"], 1))
    return s


if __name__ == "__main__":
    main()


__all__ = ["LocalMesh", "main"]
