"""`meshserve up`: run the local mesh in the foreground until Ctrl-C or SIGTERM.

The command line lives here, with the other CLIs; services/localmesh is the library it drives
(and the tests use), so the library never imports CLI code.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

import grpc

from services.common import grpc_util, ports
from services.common.logging_setup import setup_logging
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from services.localmesh.processes import StartError
from services.localmesh.serverpool import PoolSettings, ServerPool, parse_range

from .inference_client import build_request, generate

log = logging.getLogger("meshserve.up")

DEFAULT_MODEL = "smollm2=torch:embedded"
#: Envoy's port; the others follow it up to +80 (docs/architecture.md). Below Linux's default
#: ephemeral range (32768-60999), so outgoing connections never hold one of them.
DEFAULT_BASE_PORT = 18000
DEMO_QUESTION = "What is the capital of France?"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=".meshserve", help="etcd data and logs go here")
    p.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT,
                   help="Envoy listens on this port; the others follow it up to +80 (0 = free "
                        "ports outside the OS's ephemeral range)")
    p.add_argument("--servers", type=int, default=2, help="model servers to start")
    p.add_argument("--server-pool", default="", metavar="MIN:MAX",
                   help="start MIN model servers and let the control plane's demand start more, "
                        "up to MAX, and stop idle ones (replaces --servers)")
    p.add_argument("--pool-idle-s", type=float, default=60.0,
                   help="a pool server that holds no model this long is stopped (down to MIN)")
    p.add_argument("--routers", type=int, default=1)
    p.add_argument("--gateways", type=int, default=1,
                   help="OpenAI gateways behind Envoy's /v1/chat/completions, /v1/completions and "
                        "/v1/models (0: none)")
    p.add_argument("--model", action="append", default=[],
                   help=f"NAME=BACKEND[:SOURCE] deployed on every server (default {DEFAULT_MODEL}); "
                        "SOURCE is 'embedded', a path under a --model-dir, or a file path whose "
                        "folder then becomes a model directory of every server")
    p.add_argument("--model-dir", action="append", default=[], metavar="DIR",
                   help="model directory of every server: deployed sources are relative to it")
    p.add_argument("--engine-option", action="append", default=[], help="key=value for engines")
    p.add_argument("--cache-store-mb", type=int, default=1024,
                   help="maxmemory of the shared cache store (redis-server, allkeys-lru); 0 = no store")
    p.add_argument("--otlp-traces-endpoint", default="", metavar="HOST:PORT",
                   help="OTLP/gRPC collector for every process's spans, Envoy's included ('' = off)")
    p.add_argument("--insecure-dev", action="store_true",
                   help="plaintext gRPC and etcd everywhere, no certificates (development only; "
                        "default: mTLS with a CA in DATA_DIR/certs, made on first start)")
    p.add_argument("--jetstream-nodes", type=int, default=1, choices=[0, 1, 3],
                   help="NATS JetStream servers for jobs and batches (data under --data-dir/jetstream; 3 = a "
                        "cluster keeping 3 replicas; 0 = no JobService)")
    p.add_argument("--job-workers", type=int, default=1,
                   help="job worker processes (they run jobs and batches on spare capacity)")
    p.add_argument("--demo", action="store_true",
                   help="send a demo request through Envoy once the mesh is up")


def _print_endpoints(mesh: LocalMesh, model: str, api_key: str) -> None:
    from services.localmesh.prometheus import write_config

    prometheus = write_config(mesh, mesh.data_dir / "prometheus")
    auth = ' -H "authorization: Bearer $MESHSERVE_API_KEY"' if api_key else ""
    lines = [
        "MeshServe local mesh is up.",
        f"  public API (gRPC + JSON) via Envoy  {mesh.envoy}",
        *([f"  OpenAI API via Envoy                http://{mesh.envoy}/v1"] if mesh.gateways else []),
        f"  Envoy admin                         {mesh.envoy_admin}",
        f"  control plane (meshctl)             {mesh.controlplane}",
        *(f"  router {i}                            {r}" for i, r in enumerate(mesh.routers)),
        *(f"  OpenAI gateway {i}                    http://{a}" for i, a in enumerate(mesh.gateways_http)),
        *(f"  model server {sid:<22} {a}" for sid, a in mesh.servers.items()),
        f"  etcd                                {mesh.etcd_endpoints}",
        *([f"  shared cache store (redis)          {mesh.cache_store}"] if mesh.cache_store else []),
        *([f"  JetStream (jobs, batches)           {mesh.jetstream_urls}"] if mesh.nats else []),
        *(f"  job worker {i}                        {a}" for i, a in enumerate(mesh.jobworkers)),
        *(f"  metrics {name:<27} http://{a}/metrics" for name, a in mesh.metrics.items()),
        f"  logs                                {mesh.sup.log_dir}",
        (f"  certificates (mTLS on every hop)    {mesh.certs_dir}  (meshctl uses operator.crt; "
         "`meshctl certs list`)" if mesh.plan.secure else
         "  *** PLAINTEXT (--insecure-dev): no mTLS, anyone on this host can call every port ***"),
        f"  Prometheus config (rules, targets)  {prometheus}  (dashboard: deploy/grafana/meshserve.json)",
        *([f"  API key of tenant {DEMO_TENANT} (every model)  {mesh.data_dir / 'demo-api-key'}",
           "Try (the edge wants an API key):",
           f"  export MESHSERVE_API_KEY=$(cat {mesh.data_dir / 'demo-api-key'})"] if api_key else ["Try:"]),
        f"  meshctl --controlplane {mesh.controlplane}"
        f"{'' if mesh.plan.secure else ' --insecure-dev'} status",
        f"  meshctl --endpoint {mesh.envoy} generate {model} 'What is the capital of France?'",
        *([f"  meshctl --endpoint {mesh.envoy} jobs submit {model} 'Write a haiku' --watch"] if mesh.nats else []),
        f"  curl -s -X POST http://{mesh.envoy}/v1/generate{auth} -d "
        f"'{{\"model\":\"{model}\","
        f"\"messages\":[{{\"role\":\"user\",\"content\":\"Hi!\"}}]}}'",
        *([f"  curl -s http://{mesh.envoy}/v1/chat/completions{auth} -H 'content-type: application/json' -d "
           f"'{{\"model\":\"{model}\",\"messages\":[{{\"role\":\"user\",\"content\":\"Hi!\"}}]}}'"]
          if mesh.gateways else []),
        "Ctrl-C stops everything.",
    ]
    print("\n".join(lines), flush=True)


def deploy_sources(models: list[str], model_dirs: list[str]) -> tuple[list[str], list[str]]:
    """Deployments may only name sources relative to the servers' model directories: a model
    given as a host path (`x=torch:/data/m.gguf`) is deployed as `m.gguf`, with its folder
    added to the model directories. Returns (models, model directories)."""
    import os

    from services.modelserver.engine import ModelSpec

    dirs = [os.path.abspath(d) for d in model_dirs]
    out = []
    for text in models:
        m = ModelSpec.parse(text)
        source = m.source
        if m.backend != "sim" and source != "embedded" and os.path.isabs(source):
            folder, source = os.path.split(source.rstrip("/"))
            if folder not in dirs:
                dirs.append(folder)
        out.append(f"{m.name}={m.backend}:{source}")
    return out, dirs


def _deploy(mesh: LocalMesh, models: list[str], replicas: int, options: list[str],
            timeout: float) -> None:
    """Deploy through the control plane, as an operator would, and wait for READY replicas."""
    import time

    from meshserve.v1 import controlplane_pb2 as cp
    from meshserve.v1 import controlplane_pb2_grpc

    from services.common.lifecycle import parse_option
    from services.modelserver.engine import ModelSpec
    from services.modelserver.engine.options import known

    with grpc_util.channel(mesh.controlplane, options=[], tls=mesh.operator_tls) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneServiceStub(channel)
        for text in models:
            m = ModelSpec.parse(text)
            spec = cp.ModelSpec(name=m.name, backend=m.backend, replicas=replicas,
                                source="" if m.backend == "sim" else m.source)
            for option in options:
                key, value = parse_option(option)
                if known(m.backend, key):  # each option goes to the models whose backend has it
                    spec.options[key] = str(value).lower() if isinstance(value, bool) else str(value)
            try:
                stub.DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)
                print(f"deployed {m.name} ({m.backend}) with {replicas} replica(s); loading ...",
                      flush=True)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                    raise
        deadline = time.monotonic() + timeout
        names = {ModelSpec.parse(t).name for t in models}
        while time.monotonic() < deadline:
            deps = stub.ListDeployments(cp.ListDeploymentsRequest(), timeout=10).deployments
            if all(d.ready_replicas >= d.spec.replicas for d in deps if d.spec.name in names):
                return
            time.sleep(0.2)
        raise StartError(f"models {sorted(names)} were not ready within {timeout:.0f}s; "
                         f"see `meshctl --controlplane {mesh.controlplane} placement` and the "
                         f"server logs in {mesh.sup.log_dir}")


DEMO_TENANT = "demo"


def demo_key(mesh: LocalMesh) -> str:
    """A secure mesh's edge wants an API key: tenant `demo` (every model) gets a fresh one, kept
    in DATA_DIR/demo-api-key (mode 0600) for the README's commands. '' when plaintext."""
    import os

    from meshserve.v1 import auth_pb2 as ap
    from meshserve.v1 import auth_pb2_grpc

    if not mesh.plan.secure:
        return ""
    with grpc_util.channel(mesh.controlplane, options=[], tls=mesh.operator_tls) as channel:
        stub = auth_pb2_grpc.AuthServiceStub(channel)
        try:
            stub.CreateTenant(ap.CreateTenantRequest(tenant=ap.Tenant(name=DEMO_TENANT, models=["*"])),
                              timeout=10)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
        key = stub.CreateApiKey(ap.CreateApiKeyRequest(tenant=DEMO_TENANT), timeout=10).api_key
    path = mesh.data_dir / "demo-api-key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key + "\n")
    return key


def _demo(mesh: LocalMesh, model: str, api_key: str) -> None:
    request = build_request(model, DEMO_QUESTION, chat=True, max_tokens=32)
    try:
        answer = generate(mesh.envoy, request, timeout=120, api_key=api_key)
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


def _warn_ephemeral(mesh: LocalMesh) -> None:
    """A fixed port inside the ephemeral range works until an outgoing connection holds it."""
    risky = mesh.ports.ephemeral()
    if risky:
        low, high = ports.ephemeral_range()
        print(f"meshserve up: warning: {', '.join(risky)} lie in the OS's ephemeral port range "
              f"{low}-{high}; outgoing connections may take them. Choose a --base-port below "
              f"{low - 300} or above {high}.", file=sys.stderr)


def _pool_settings(args: argparse.Namespace) -> PoolSettings | None:
    if not args.server_pool:
        return None
    low, high = parse_range(args.server_pool)
    if low < 1:
        raise ValueError(f"--server-pool {args.server_pool}: MIN must be >= 1 (the model is "
                         "deployed on it at start)")
    return PoolSettings(low, high, idle_s=args.pool_idle_s)


def _pool(mesh: LocalMesh, settings: PoolSettings) -> ServerPool:
    """The server pool, asking the control plane what placement lacks."""
    from meshserve.v1 import autoscale_pb2, autoscale_pb2_grpc

    stub = autoscale_pb2_grpc.AutoscaleServiceStub(
        grpc_util.channel(mesh.controlplane, options=[], tls=mesh.operator_tls))
    print(f"server pool: {settings.min_servers}-{settings.max_servers} model servers, started and "
          f"stopped by demand (idle {settings.idle_s:g}s)", flush=True)
    return ServerPool(mesh, settings, lambda: stub.GetCapacity(
        autoscale_pb2.GetCapacityRequest(), timeout=2.0))


def _plan(args: argparse.Namespace) -> tuple[MeshPlan, list[str], int, PoolSettings | None]:
    """The mesh to start, the models to deploy on `count` servers, and the server pool if any;
    ValueError for flags that do not fit."""
    models, model_dirs = deploy_sources(args.model or [DEFAULT_MODEL], args.model_dir)
    pool = _pool_settings(args)
    zones = ["local-a", "local-b"]
    dir_args = [arg for d in model_dirs for arg in ("--model-dir", d)]
    count = pool.min_servers if pool else args.servers
    planned = [ServerPlan(f"server-{i}", zone=zones[i % len(zones)], extra_args=dir_args)
               for i in range(pool.max_servers if pool else count)]
    plan = MeshPlan(data_dir=Path(args.data_dir), routers=args.routers, base_port=args.base_port,
                    otlp_endpoint=args.otlp_traces_endpoint, gateways=args.gateways,
                    cache_store_bytes=max(0, args.cache_store_mb) << 20,
                    servers=planned[:count],
                    standby_servers=planned[count:], jetstream_nodes=args.jetstream_nodes,
                    job_workers=args.job_workers if args.jetstream_nodes else 0,
                    secure=not args.insecure_dev)
    return plan, models, count, pool


def _watch(mesh: LocalMesh, stop: threading.Event, pool_loop: ServerPool | None) -> None:
    """Until asked to stop: step the server pool; end when a child exits unexpectedly."""
    while not stop.is_set():
        if pool_loop is not None:
            pool_loop.step()
        for name, child in mesh.children.items():
            if not child.alive():
                log.error("%s exited unexpectedly (code %s); see %s", name,
                          child.returncode, child.log_path)
                stop.set()
                break
        stop.wait(1.0)


def _deploy_and_greet(mesh: LocalMesh, args: argparse.Namespace, models: list[str], count: int) -> bool:
    """Deploy the models, make the demo API key, print the endpoints (and answer the demo)."""
    try:
        _deploy(mesh, models, count, args.engine_option, mesh.plan.load_timeout_s)
    except (StartError, grpc.RpcError, ValueError) as exc:
        print(f"meshserve up: deploying {models} failed: {exc}", file=sys.stderr)
        return False
    try:
        api_key = demo_key(mesh)
    except grpc.RpcError as exc:
        print(f"meshserve up: making the demo API key failed: {exc}", file=sys.stderr)
        return False
    _print_endpoints(mesh, models[0].split("=")[0], api_key)
    if args.demo:
        _demo(mesh, models[0].split("=")[0], api_key)
    return True


def up(args: argparse.Namespace) -> int:
    setup_logging("up")
    try:
        plan, models, count, pool = _plan(args)
    except ValueError as exc:
        print(f"meshserve up: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    mesh = LocalMesh(plan)
    _warn_ephemeral(mesh)
    if args.insecure_dev:
        from services.common.tls import INSECURE_WARNING
        print(f"meshserve up: {INSECURE_WARNING}", file=sys.stderr, flush=True)
    try:
        print(f"starting the local mesh in {mesh.data_dir} ...", flush=True)
        mesh.start()
    except (StartError, FileNotFoundError) as exc:
        print(f"meshserve up: {exc}", file=sys.stderr)
        return 1
    try:
        if not _deploy_and_greet(mesh, args, models, count):
            return 1
        _watch(mesh, stop, _pool(mesh, pool) if pool else None)
    finally:
        print("stopping the local mesh ...", flush=True)
        mesh.stop()
        print("stopped; no MeshServe process is left running.", flush=True)
    return 0
