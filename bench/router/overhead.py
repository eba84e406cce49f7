"""Latency Envoy plus router add over calling a model server directly (sim engine, short
answers, open loop), and the largest request rate one router process sustains."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from meshserve.v1 import inference_pb2, modelserver_pb2

from services.common.grpc_util import aio_channel
from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import running_mesh

from .common import mesh_cpu_meter, open_loop, pct, progress

MODEL = "echo"
RATES = (100, 500, 1000)
SECONDS = 4.0  # per path and rate, in ROUNDS turns
ROUNDS = 4
MAX_RPS_STEPS = (200, 300, 400, 500, 700, 1000, 1500)
SIM = ["tokens_per_second=20000", "first_token_latency_s=0.0005", "max_running=512",
       "max_waiting=4096"]


def _public() -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=MODEL, prompt="ping pong")
    r.sampling.max_tokens = 2
    return r


def _internal() -> modelserver_pb2.ModelServerServiceGenerateRequest:
    r = modelserver_pb2.ModelServerServiceGenerateRequest(model=MODEL, prompt="ping pong")
    r.sampling.max_tokens = 2
    return r


def _method(pb2, service: str, rpc: str) -> str:
    return f"/{pb2.DESCRIPTOR.services_by_name[service].full_name}/{rpc}"


class Clients:
    """The load generator: one channel per path (model server direct, router, Envoy).

    It shares the cores with what it measures, so it does as little as it can per request:
    requests are serialized once, and answers are drained as bytes, never parsed (a failure
    still arrives as a gRPC status)."""

    def __init__(self, mesh, api_key: str = "") -> None:
        self.targets = {"direct": mesh.servers["server-0"], "router": mesh.routers[0],
                        "envoy": mesh.envoy}
        # Internal ports with the mesh's client certificate when it runs mTLS; Envoy's public
        # listener stays plaintext and wants the API key then.
        self._channels = {k: aio_channel(a, options=[], tls=None if k == "envoy" else mesh.client_tls)
                          for k, a in self.targets.items()}
        self._metadata = {"envoy": (("authorization", f"Bearer {api_key}"),) if api_key else ()}
        public = _method(inference_pb2, "InferenceService", "GenerateStream")
        self._calls = {
            "direct": (self._channels["direct"].unary_stream(
                _method(modelserver_pb2, "ModelServerService", "Generate")),
                _internal().SerializeToString()),
            **{k: (self._channels[k].unary_stream(public), _public().SerializeToString())
               for k in ("router", "envoy")}}

    def caller(self, path: str):
        call, payload = self._calls[path]
        metadata = self._metadata.get(path, ())

        async def one() -> None:
            async for _ in call(payload, timeout=10, metadata=metadata):
                pass
        return one

    async def close(self) -> None:
        for ch in self._channels.values():
            await ch.close()


async def _paths_at(rate: float, clients: Clients, cpu) -> tuple[dict, dict]:
    """Each path at `rate` for SECONDS in all, in ROUNDS short turns (direct, router, Envoy,
    direct, ...) so that a noisy neighbour on the shared cores hits every path alike.
    Returns (latency row, CPU ms per request) by path."""
    lat: dict[str, list[float]] = {p: [] for p in clients.targets}
    failed = dict.fromkeys(clients.targets, 0)
    busy = dict.fromkeys(clients.targets, 0.0)
    used = {p: dict.fromkeys(cpu.pids, 0.0) for p in clients.targets}
    for _ in range(ROUNDS):
        for path in clients.targets:
            before = cpu.snapshot()
            started = time.perf_counter()
            got, lost, _ = await open_loop(rate, SECONDS / ROUNDS, clients.caller(path))
            busy[path] += time.perf_counter() - started
            for name, seconds in cpu.since(before).items():
                used[path][name] += seconds
            lat[path] += got
            failed[path] += lost
    row, cpu_ms = {}, {}
    for path in clients.targets:
        n = len(lat[path]) + failed[path]
        row[path] = {"p50_ms": pct(lat[path], 50) * 1e3, "p99_ms": pct(lat[path], 99) * 1e3,
                     "failed": failed[path], "achieved_rps": round(len(lat[path]) / busy[path], 1)}
        cpu_ms[path] = {name: round(s * 1e3 / max(1, n), 3) for name, s in used[path].items()}
        progress(f"overhead {rate}/s {path}: p50 {row[path]['p50_ms']:.2f} ms "
                 f"p99 {row[path]['p99_ms']:.2f} ms failed {failed[path]}; CPU ms per request "
                 f"{cpu_ms[path]}")
    return row, cpu_ms


async def _measure(mesh) -> dict:
    # Whatever else runs on the machine shares its cores: say how busy it was.
    conditions = {"cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    clients = Clients(mesh)
    caller = clients.caller
    cpu = mesh_cpu_meter(mesh)
    for path in clients.targets:  # warm connections and code paths
        await open_loop(50, 1.0, caller(path))
    out: dict = {}
    for rate in RATES:
        row, cpu_ms = await _paths_at(rate, clients, cpu)
        out[str(rate)] = {
            "added_p50_ms": round(row["envoy"]["p50_ms"] - row["direct"]["p50_ms"], 3),
            "added_p99_ms": round(row["envoy"]["p99_ms"] - row["direct"]["p99_ms"], 3),
            "router_only_added_p50_ms": round(row["router"]["p50_ms"] - row["direct"]["p50_ms"], 3),
            "router_only_added_p99_ms": round(row["router"]["p99_ms"] - row["direct"]["p99_ms"], 3),
            "paths": {k: {m: round(v, 3) for m, v in d.items()} for k, d in row.items()},
            "cpu_ms_per_request": cpu_ms}
    best = 0
    steps = {}
    for rate in MAX_RPS_STEPS:
        lat, failed, achieved = await open_loop(rate, 3.0, caller("router"))
        ok = failed == 0 and achieved >= 0.95 * rate and pct(lat, 99) < 0.25
        steps[str(rate)] = {"achieved_rps": round(achieved, 1), "failed": failed,
                            "p99_ms": round(pct(lat, 99) * 1e3, 2), "sustained": ok}
        progress(f"max-rps step {rate}/s: achieved {achieved:.0f}/s p99 "
                 f"{pct(lat, 99) * 1e3:.1f} ms failed {failed} -> {'ok' if ok else 'not sustained'}")
        if not ok:
            break
        best = rate
    await clients.close()
    return {"overhead": out, "max_rps_one_router": best, "max_rps_steps": steps,
            "overhead_conditions": conditions}


def run() -> dict:
    progress("overhead: starting etcd, control plane, 1 sim server, 1 router, Envoy")
    with tempfile.TemporaryDirectory(prefix="bench-router-") as tmp:
        plan = MeshPlan(data_dir=Path(tmp), base_port=0, lease_ttl=5,
                        servers=[ServerPlan("server-0", [f"{MODEL}=sim"], engine_options=SIM)])
        with running_mesh(plan) as mesh:
            return asyncio.run(_measure(mesh))
