"""`meshserve up`: run the local mesh in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import grpc

from services.common.logging_setup import setup_logging

from .mesh import LocalMesh, MeshPlan, ServerPlan
from .processes import StartError

log = logging.getLogger("meshserve.up")

DEFAULT_MODEL = "echo=sim"
DEMO_QUESTION = "What is the capital of France?"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=".meshserve", help="etcd data and logs go here")
    p.add_argument("--base-port", type=int, default=18000,
                   help="Envoy listens on this port; the others follow it (0 = any free ports)")
    p.add_argument("--servers", type=int, default=2, help="model servers to start")
    p.add_argument("--routers", type=int, default=1)
    p.add_argument("--model", action="append", default=[],
                   help=f"NAME=BACKEND[:SOURCE] for every server (default {DEFAULT_MODEL})")
    p.add_argument("--engine-option", action="append", default=[], help="key=value for engines")
    p.add_argument("--demo", action="store_true",
                   help="send a demo request through Envoy once the mesh is up")


def _print_endpoints(mesh: LocalMesh) -> None:
    lines = [
        "MeshServe local mesh is up.",
        f"  public API (gRPC + JSON) via Envoy  {mesh.envoy}",
        f"  Envoy admin                         {mesh.envoy_admin}",
        f"  control plane (meshctl)             {mesh.controlplane}",
        *(f"  router {i}                            {r}" for i, r in enumerate(mesh.routers)),
        *(f"  model server {sid:<22} {a}" for sid, a in mesh.servers.items()),
        f"  etcd                                {mesh.etcd_endpoints}",
        *(f"  metrics {name:<27} http://{a}/metrics" for name, a in mesh.metrics.items()),
        f"  logs                                {mesh.sup.log_dir}",
        "Try:",
        f"  meshctl --controlplane {mesh.controlplane} status",
        f"  meshctl --endpoint {mesh.envoy} generate {mesh.plan.servers[0].models[0].split('=')[0]}"
        f" 'What is the capital of France?'",
        f"  curl -s -X POST http://{mesh.envoy}/v1/generate -d "
        f"'{{\"model\":\"{mesh.plan.servers[0].models[0].split('=')[0]}\","
        f"\"messages\":[{{\"role\":\"user\",\"content\":\"Hi!\"}}]}}'",
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


def _demo(mesh: LocalMesh, model: str) -> None:
    from services.cli.inference_client import build_request, generate

    request = build_request(model, DEMO_QUESTION, chat=True, max_tokens=32)
    try:
        answer = generate(mesh.envoy, request, timeout=120)
    except grpc.RpcError as exc:
        print(f"demo request failed: {exc.code().name}: {exc.details()}", flush=True)
        return
    sb = answer.served_by
    kind = "SIMULATED engine (echo, not a model)" if sb.simulated else f"{sb.backend} engine"
    print(f"\nDemo: client -> Envoy {mesh.envoy} -> router {sb.router_id} -> "
          f"model server {sb.server_id} ({sb.region}/{sb.zone}, {kind})\n"
          f"  Q: {DEMO_QUESTION}\n  A: {answer.text.strip()}\n"
          f"  usage: {answer.usage.prompt_tokens} prompt, {answer.usage.completion_tokens} completion, "
          f"{answer.usage.cached_tokens} cached tokens\n", flush=True)


def up(args: argparse.Namespace) -> int:
    setup_logging("up")
    models = args.model or [DEFAULT_MODEL]
    zones = ["local-a", "local-b"]
    plan = MeshPlan(
        data_dir=Path(args.data_dir), routers=args.routers, base_port=args.base_port,
        servers=[ServerPlan(f"server-{i}", models, zone=zones[i % len(zones)],
                            engine_options=args.engine_option) for i in range(args.servers)])
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh = LocalMesh(plan)
    try:
        print(f"starting the local mesh in {mesh.data_dir} ...", flush=True)
        mesh.start()
    except (StartError, FileNotFoundError) as exc:
        print(f"meshserve up: {exc}", file=sys.stderr)
        return 1
    try:
        _print_endpoints(mesh)
        if args.demo:
            _demo(mesh, models[0].split("=")[0])
        while not stop.is_set():
            for name, child in mesh.children.items():
                if not child.alive():
                    log.error("%s exited unexpectedly (code %s); see %s", name,
                              child.proc.returncode, child.log_path)
                    stop.set()
                    break
            stop.wait(1.0)
    finally:
        print("stopping the local mesh ...", flush=True)
        mesh.stop()
        print("stopped; no MeshServe process is left running.", flush=True)
    return 0
