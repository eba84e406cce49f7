"""What mTLS (and the edge's API-key check) costs: the same overhead measurement on a plaintext
mesh (--insecure-dev) and on a secure one, side by side.

Per path and rate: p50/p99 of a 2-token answer from the sim engine, called directly on the model
server, on the router, and through Envoy. On the secure mesh every internal hop is mTLS and the
path through Envoy also runs ext_authz (one HTTP check at a router per request), so
`envoy` minus `direct` there is the whole price of security on the request path."""

from __future__ import annotations

import asyncio
import os
import tempfile
from pathlib import Path

from services.cli.up import demo_key
from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import running_mesh

from .common import open_loop, pct, progress
from .overhead import MODEL, SIM, Clients

RATES = (100, 300)
SECONDS = 3.0
ROUNDS = 3


async def _measure(mesh, api_key: str) -> dict:
    clients = Clients(mesh, api_key=api_key)
    for path in clients.targets:  # warm connections (TLS handshakes) and code paths
        await open_loop(50, 1.0, clients.caller(path))
    out: dict = {}
    for rate in RATES:
        lat: dict[str, list[float]] = {p: [] for p in clients.targets}
        failed = dict.fromkeys(clients.targets, 0)
        for _ in range(ROUNDS):  # interleaved turns, so a noisy neighbour hits every path alike
            for path in clients.targets:
                got, lost, _ = await open_loop(rate, SECONDS / ROUNDS, clients.caller(path))
                lat[path] += got
                failed[path] += lost
        out[str(rate)] = {p: {"p50_ms": round(pct(v, 50) * 1e3, 3), "p99_ms": round(pct(v, 99) * 1e3, 3),
                              "failed": failed[p]} for p, v in lat.items()}
    await clients.close()
    return out


def _one(secure: bool) -> dict:
    label = "mTLS + API key" if secure else "plaintext (--insecure-dev)"
    progress(f"mtls: {label} mesh: etcd, control plane, 1 sim server, 1 router, Envoy")
    with tempfile.TemporaryDirectory(prefix="bench-mtls-") as tmp:
        plan = MeshPlan(data_dir=Path(tmp), base_port=0, lease_ttl=5, secure=secure,
                        servers=[ServerPlan("server-0", [f"{MODEL}=sim"], engine_options=SIM)])
        with running_mesh(plan) as mesh:
            result = asyncio.run(_measure(mesh, demo_key(mesh)))
    for rate, paths in result.items():
        progress(f"mtls {label} {rate}/s: " + ", ".join(
            f"{p} p50 {v['p50_ms']:.2f} p99 {v['p99_ms']:.2f} ms" for p, v in paths.items()))
    return result


def run() -> dict:
    return {"conditions": {"cpus": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 2)},
            "plaintext": _one(secure=False), "mtls": _one(secure=True)}


def markdown(d: dict) -> list[str]:
    """The side-by-side table for router.md."""
    lines = ["## Security overhead: plaintext vs mTLS (+ API key at the edge)", "",
             "p50 / p99 ms of a 2-token sim answer; `envoy` on the secure mesh includes the "
             "ext_authz check.", "",
             "| rate (req/s) | path | plaintext p50 | mTLS p50 | plaintext p99 | mTLS p99 |",
             "|---|---|---|---|---|---|"]
    for rate in sorted(d.get("plaintext", {}), key=int):
        for path, plain in d["plaintext"][rate].items():
            sec = d.get("mtls", {}).get(rate, {}).get(path, {})
            lines.append(f"| {rate} | {path} | {plain['p50_ms']:.3f} | {sec.get('p50_ms', 'n/a')} | "
                         f"{plain['p99_ms']:.3f} | {sec.get('p99_ms', 'n/a')} |")
    c = d.get("conditions")
    if c:
        lines += ["", f"Measured on {c['cpus']} CPUs, 1-minute load average {c['loadavg_1m_at_start']} "
                      "at the start."]
    return lines + [""]
