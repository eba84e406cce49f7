"""`python -m bench.autoscale.run [--smoke]`: the autoscaling benchmark of issue 13.

One mesh of real processes (etcd, a control plane, a router, Envoy, two groups of sim model
servers in regions `react` and `pred`), three phases: a load ramp (with the scale-from-zero phase
alongside on the other group), then a compressed diurnal day played to a reactive-only and a
predictive model at once. Results in bench/results/autoscale.{json,md} (autoscale-smoke.* with
--smoke). Every process is stopped by PID at the end, whatever happened.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc
from meshserve.v1 import autoscale_pb2_grpc, controlplane_pb2_grpc

from services.common.etcd_client import EtcdClient
from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import running_mesh

from .config import FULL, SMOKE, Settings
from .diurnal import diurnal_phase
from .phases import Ctx, ramp_phase, zero_phase
from .report import markdown

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
IDLE_UNLOAD_S = 5.0


def plan(data_dir: Path, s: Settings) -> MeshPlan:
    servers = [ServerPlan(f"{g[0]}{i}", region=g, zone=f"{g}-{'abc'[i % 3]}",
                          extra_args=["--idle-unload-s", str(IDLE_UNLOAD_S)])
               for g in ("react", "pred") for i in range(s.servers_per_group)]
    return MeshPlan(data_dir=data_dir, base_port=0, lease_ttl=5, servers=servers)


async def phases(mesh, s: Settings) -> dict:
    channel = grpc.aio.insecure_channel(mesh.controlplane)
    ctx = Ctx(s, mesh.envoy, mesh.controlplane, mesh.metrics["router0"],
              autoscale_pb2_grpc.AutoscaleServiceStub(channel),
              controlplane_pb2_grpc.ControlPlaneServiceStub(channel))
    etcd = EtcdClient(mesh.etcd_endpoints)
    try:
        ramp, zero = await asyncio.gather(ramp_phase(ctx), zero_phase(ctx, IDLE_UNLOAD_S))
        print(f"ramp: {json.dumps({k: v for k, v in ramp.items() if k != 'decisions'})}", flush=True)
        print(f"zero: {json.dumps(zero)}", flush=True)
        diurnal = await diurnal_phase(ctx, etcd)
    finally:
        await etcd.close()
        await channel.close()
    return {"ramp": ramp, "zero": zero, "diurnal": diurnal}


def summarise(r: dict) -> None:
    react, pred = r["diurnal"]["reactive"], r["diurnal"]["predictive"]
    r["scale_up_s"] = r["ramp"]["scale_up_s"]
    r["scale_down_s"] = r["ramp"]["scale_down_s"]
    r["from_zero_failed"] = r["zero"]["from_zero_failed"]
    r["ttft_from_zero_p50_s"] = r["zero"]["ttft_from_zero_p50_s"]
    r["ttft_from_zero_max_s"] = r["zero"]["ttft_from_zero_max_s"]
    r["reactive_replica_seconds"] = react["replica_seconds"]
    r["predictive_replica_seconds"] = pred["replica_seconds"]
    r["predictive_violation_reduction"] = (1 - pred["slo_violations"] / react["slo_violations"]
                                           if react["slo_violations"] else None)
    r["predictive_extra_replica_seconds"] = (pred["replica_seconds"] / react["replica_seconds"] - 1
                                             if react["replica_seconds"] else None)
    r["limit_violations"] = (r["ramp"]["limit_violations"] + react["limit_violations"]
                             + pred["limit_violations"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="short phases, fewer servers")
    args = parser.parse_args(argv)
    s = SMOKE if args.smoke else FULL
    result: dict = {"settings": dataclasses.asdict(s), "cpus": os.cpu_count(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "load_before": [round(x, 2) for x in os.getloadavg()]}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-autoscale-") as tmp, \
            running_mesh(plan(Path(tmp), s)) as mesh:
        result.update(asyncio.run(phases(mesh, s)))
    result["duration_s"] = time.monotonic() - began
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    result["noise"] = (f"1-minute load average {result['load_before'][0]} >= {result['cpus']} CPUs "
                       "before the run" if result["load_before"][0] >= (result["cpus"] or 1) else "")
    summarise(result)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{s.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{s.name}.md").write_text(markdown(result))
    trace = result["diurnal"].get("backtest", {}).get("trace")
    if trace:  # the recorded history, for `meshctl autoscale backtest`
        (RESULTS / f"{s.name}-trace.csv").write_text(
            "rate\n" + "".join(f"{r:.4f}\n" for r in trace))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
