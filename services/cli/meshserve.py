"""`meshserve`: run one MeshServe service, or the whole local mesh (`meshserve up`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

from services.common.lifecycle import default_id, install_stop_signals, parse_option
from services.common.logging_setup import setup_logging

log = logging.getLogger("meshserve")


def _run_service(component: str, run: Callable[[asyncio.Event], Awaitable[None]],
                 args: argparse.Namespace, service: str, instance: str) -> int:
    """Run one service until SIGTERM/SIGINT; with --otlp-traces-endpoint its spans are exported
    (as `service`, instance `instance`) and flushed on the way out."""
    from services.common import grpc_util, tls, tracing

    setup_logging(component)

    async def main() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await run(stop)

    try:
        grpc_util.configure_tls(tls.from_arguments(args, instance))
        tracing.configure(service, instance, args.otlp_traces_endpoint)
        asyncio.run(main())
    except Exception as exc:
        log.error("%s failed: %s", component, exc, exc_info=log.isEnabledFor(logging.DEBUG))
        return 1
    finally:
        tracing.shutdown()
    return 0


def _server_options(texts: list[str]) -> dict[str, object]:
    """--engine-option values, each checked against every backend that knows it."""
    from services.modelserver.engine import options as schema

    out = dict(parse_option(o) for o in texts)
    for key, value in out.items():
        backends = [b for b in schema.BACKENDS if schema.known(b, key)]
        if not backends:
            raise ValueError(f"--engine-option {key}: no backend knows it; options:\n"
                             + "\n".join(f"{b}:\n{schema.describe(b)}" for b in schema.BACKENDS))
        for backend in backends:
            schema.validate_options(backend, {key: value}, allow_server_only=True)
    return out


def _model_dirs(dirs: list[str]) -> list[str]:
    import os

    for d in dirs:
        if not os.path.isdir(d):
            raise ValueError(f"--model-dir {d!r} is not a directory")
    return [os.path.abspath(d) for d in dirs]


def cmd_modelserver(args: argparse.Namespace) -> int:
    from services.common.names import check_label
    from services.modelserver.engine import ModelSpec
    from services.modelserver.engine.options import known
    from services.modelserver.server import ModelServerConfig, run

    options = _server_options(args.engine_option)
    specs = []
    for text in args.model:
        spec = ModelSpec.parse(text)
        mine = {k: v for k, v in options.items() if known(spec.backend, k)}
        specs.append(ModelSpec(spec.name, spec.backend, spec.source, mine))
    labels = dict(check_label(*label.partition("=")[::2]) for label in args.label)
    config = ModelServerConfig(
        server_id=args.id or default_id("server"), models=specs, listen=args.listen,
        advertise=args.advertise, region=args.region, zone=args.zone, etcd=args.etcd,
        metrics=args.metrics, lease_ttl=args.lease_ttl, memory_bytes=args.memory_bytes,
        idle_unload_s=args.idle_unload_s, failure_backoff_s=args.failure_backoff_s,
        engine_options=options, labels=labels, model_dirs=_model_dirs(args.model_dir),
        slow_consumer_s=args.slow_consumer_timeout, cache_store=args.cache_store)
    return _run_service(f"modelserver[{config.server_id}]", lambda stop: run(config, stop), args,
                        "meshserve-modelserver", config.server_id)


def cmd_router(args: argparse.Namespace) -> int:
    from services.router.config import DispatchSettings
    from services.router.server import RouterConfig, run

    model_policies = tuple((k, str(v)) for k, v in map(parse_option, args.model_policy))
    dispatch = DispatchSettings(
        policy=args.policy, model_policies=model_policies, max_attempts=args.max_attempts,
        max_migrations=args.max_migrations, first_token_timeout_s=args.first_token_timeout,
        stall_timeout_s=args.stall_timeout, hang_timeout_s=args.hang_timeout,
        slow_consumer_s=args.slow_consumer_timeout, shed_utilization=args.shed_utilization,
        queue_size=args.queue_size, queue_timeout_s=args.queue_timeout,
        activation_timeout_s=args.activation_timeout,
        retry_budget_ratio=args.retry_budget_ratio, retry_budget_floor=args.retry_budget_floor)
    dispatch.validate()
    config = RouterConfig(router_id=args.id or default_id("router"), listen=args.listen,
                          advertise=args.advertise, region=args.region, zone=args.zone,
                          etcd=args.etcd, metrics=args.metrics, lease_ttl=args.lease_ttl,
                          dispatch=dispatch, authz_listen=args.authz_listen, jetstream=_servers(args.jetstream),
                          jetstream_replicas=args.jetstream_replicas)
    return _run_service(f"router[{config.router_id}]", lambda stop: run(config, stop), args,
                        "meshserve-router", config.router_id)


def _servers(text: str) -> tuple[str, ...]:
    return tuple(s if "://" in s else f"nats://{s}" for s in text.split(",") if s)


def cmd_jobworker(args: argparse.Namespace) -> int:
    from services.jobs.server import JobWorkerConfig, run_worker
    from services.jobs.store import StoreSettings

    if not args.jetstream:
        raise ValueError("--jetstream is required (the JetStream servers holding the jobs)")
    if not 0 < args.fill <= 1:
        raise ValueError(f"--fill must be in (0, 1], got {args.fill}")
    store = StoreSettings(servers=_servers(args.jetstream), replicas=args.jetstream_replicas,
                          ack_wait_s=args.ack_wait, max_deliver=args.max_deliver)
    config = JobWorkerConfig(worker_id=args.id or default_id("jobworker"), store=store, listen=args.listen,
                             region=args.region, etcd=args.etcd, metrics=args.metrics, lease_ttl=args.lease_ttl,
                             fill=args.fill, max_in_flight=args.max_in_flight)
    return _run_service(f"jobworker[{config.worker_id}]", lambda stop: run_worker(config, stop), args,
                        "meshserve-jobworker", config.worker_id)


def cmd_controlplane(args: argparse.Namespace) -> int:
    from services.controlplane.health import HealthSettings
    from services.controlplane.server import ControlPlaneConfig, run

    health = HealthSettings(interval_s=args.health_interval, probe_interval_s=args.probe_interval,
                            timeout_s=args.health_timeout, probe_timeout_s=args.probe_timeout,
                            unhealthy_after=args.unhealthy_after, healthy_after=args.healthy_after)
    if not args.autoscale_interval > 0:
        raise ValueError(f"--autoscale-interval must be > 0, got {args.autoscale_interval}")
    config = ControlPlaneConfig(replica_id=args.id or default_id("controlplane"),
                                listen=args.listen, advertise=args.advertise, region=args.region,
                                etcd=args.etcd, metrics=args.metrics, lease_ttl=args.lease_ttl,
                                election_ttl=args.election_ttl, health=health,
                                halt_after_failures=args.halt_after_failures,
                                autoscale_interval_s=args.autoscale_interval)
    return _run_service(f"controlplane[{config.replica_id}]", lambda stop: run(config, stop), args,
                        "meshserve-controlplane", config.replica_id)


def cmd_openai_gateway(args: argparse.Namespace) -> int:
    from services.openai_gateway.app import GatewaySettings
    from services.openai_gateway.server import GatewayConfig, run

    if args.slow_consumer_timeout <= 0:
        raise ValueError("--slow-consumer-timeout must be > 0")
    config = GatewayConfig(gateway_id=args.id or default_id("gateway"), http=args.http, upstream=args.upstream,
                           listen=args.listen, advertise=args.advertise, region=args.region, etcd=args.etcd,
                           metrics=args.metrics, lease_ttl=args.lease_ttl,
                           settings=GatewaySettings(slow_consumer_s=args.slow_consumer_timeout))
    return _run_service(f"openai-gateway[{config.gateway_id}]", lambda stop: run(config, stop), args,
                        "meshserve-openai-gateway", config.gateway_id)


def cmd_envoy_config(args: argparse.Namespace) -> int:
    from pathlib import Path

    from services.common.envoy_config import DEFAULT_DESCRIPTOR, EnvoySettings, render

    text = render(EnvoySettings(
        listen=args.listen, admin=args.admin, routers=args.router,
        descriptor=Path(args.descriptor or DEFAULT_DESCRIPTOR), cluster_type=args.cluster_type,
        access_log=args.access_log, gateways=args.gateway))
    sys.stdout.write(text)
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    from services.cli.up import up

    return up(args)


def _common(p: argparse.ArgumentParser, listen: str) -> None:
    from services.common import tls

    tls.add_arguments(p)
    p.add_argument("--id", default="", help="replica id (default: kind-host-pid)")
    p.add_argument("--listen", default=listen, help="host:port to serve gRPC on")
    p.add_argument("--advertise", default="", help="address others dial (default: --listen)")
    p.add_argument("--region", default="local")
    p.add_argument("--etcd", default="127.0.0.1:2379", help="etcd endpoints, comma-separated")
    p.add_argument("--metrics", default="127.0.0.1:0",
                   help="host:port for Prometheus /metrics ('' disables; port 0 picks one)")
    p.add_argument("--lease-ttl", type=int, default=10, help="etcd lease TTL in seconds")
    p.add_argument("--otlp-traces-endpoint", default="", metavar="URL",
                   help="export OpenTelemetry spans to this OTLP/gRPC collector, e.g. "
                        "http://otel-collector:4317 ('' = tracing off, the default; OTEL_TRACES_SAMPLER "
                        "and OTEL_BSP_* variables apply)")


def _jetstream(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--jetstream", default="", metavar="HOST:PORT,...", help=what)
    p.add_argument("--jetstream-replicas", type=int, default=1,
                   help="copies of each stream and bucket when they are created (3 on a 3-node cluster)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("modelserver", help="run a model server")
    _common(p, "127.0.0.1:7001")
    p.add_argument("--zone", default="local-a")
    p.add_argument("--model", action="append", default=[],
                   help="pin NAME=BACKEND[:SOURCE] on this server, e.g. smollm2=torch:embedded or "
                        "echo=sim (repeatable; SOURCE may be any path on this host); placements "
                        "from the control plane add more")
    p.add_argument("--engine-option", action="append", default=[],
                   help="engine option key=value for pinned models, and the default for placed "
                        "ones whose backend knows it (e.g. threads=2, tokens_per_second=50); "
                        "`meshctl model options` lists them")
    p.add_argument("--model-dir", action="append", default=[], metavar="DIR",
                   help="directory that deployed model sources are relative to (repeatable, "
                        "searched in order); deployments cannot name host paths")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="label shown by `meshctl servers` and filtered on by `meshctl servers "
                        "--label` (repeatable)")
    p.add_argument("--memory-bytes", type=int, default=0,
                   help="memory budget for placed models (0 = unlimited)")
    p.add_argument("--cache-store", default="", metavar="URL",
                   help="shared cache store (redis://HOST:PORT/DB): KV blocks and deterministic answers "
                        "shared by every server; $MESHSERVE_CACHE_SECRET salts tenants' keys (the same "
                        "on every server and router)")
    p.add_argument("--idle-unload-s", type=float, default=300.0,
                   help="unload a released model after this long idle")
    p.add_argument("--failure-backoff-s", type=float, default=60.0,
                   help="keep a failed load reported this long so it is not retried here at once")
    p.add_argument("--slow-consumer-timeout", type=float, default=60.0,
                   help="cancel a generation whose caller read nothing for this many seconds")
    p.set_defaults(func=cmd_modelserver)

    p = sub.add_parser("router", help="run a router")
    _common(p, "127.0.0.1:8001")
    p.add_argument("--authz-listen", default="", metavar="HOST:PORT",
                   help="serve Envoy's ext_authz API-key check here (HTTP; mTLS with --tls-dir); "
                        "'' = none")
    p.add_argument("--zone", default="", help="the router's zone (requests prefer servers there)")
    p.add_argument("--policy", default="meshserve",
                   choices=["meshserve", "least_load", "round_robin", "meshserve_text"],
                   help="how to pick a server: meshserve (locality, session affinity, prefix "
                        "cache - on KV events where servers publish them - and load), or the "
                        "baselines least_load / round_robin / meshserve_text (prefix by the text guess)")
    p.add_argument("--model-policy", action="append", default=[], metavar="MODEL=POLICY",
                   help="a different policy for one model (repeatable)")
    p.add_argument("--max-attempts", type=int, default=3,
                   help="attempts before the first token, on different servers")
    p.add_argument("--max-migrations", type=int, default=3,
                   help="times one stream may move to another server mid-answer")
    p.add_argument("--first-token-timeout", type=float, default=60.0,
                   help="seconds an attempt may wait for its first token before another server "
                        "is tried")
    p.add_argument("--stall-timeout", type=float, default=30.0,
                   help="seconds a stream may go silent between tokens before it migrates")
    p.add_argument("--hang-timeout", type=float, default=3.0,
                   help="seconds without a load report (servers send one at least every second) after "
                        "which a server counts as hung: its streams move elsewhere at once")
    p.add_argument("--slow-consumer-timeout", type=float, default=60.0,
                   help="cancel a stream whose client read nothing for this many seconds")
    p.add_argument("--shed-utilization", type=float, default=1.0,
                   help="(running + queued) / max_running at which a server counts as saturated "
                        "for shedding and queueing")
    p.add_argument("--queue-size", type=int, default=256,
                   help="STANDARD requests that may wait for room when every server is saturated")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a queued request without a deadline waits")
    p.add_argument("--activation-timeout", type=float, default=120.0,
                   help="seconds a request without a deadline waits for the first replica of a "
                        "model scaled to zero")
    p.add_argument("--retry-budget-ratio", type=float, default=0.2,
                   help="retries + migrations allowed per request over a 10 s window")
    p.add_argument("--retry-budget-floor", type=int, default=10,
                   help="retries allowed per 10 s window regardless of traffic")
    _jetstream(p, "serve JobService (jobs and batches) from these JetStream servers (empty: not served)")
    p.set_defaults(func=cmd_router)

    p = sub.add_parser("jobworker", help="run a job worker: jobs and batch lines on spare capacity")
    _common(p, "127.0.0.1:0")
    _jetstream(p, "the JetStream servers holding jobs and batches (required)")
    p.add_argument("--fill", type=float, default=0.5,
                   help="background work fills a replica only up to this share of its running capacity")
    p.add_argument("--max-in-flight", type=int, default=64, help="generations in flight in this worker")
    p.add_argument("--ack-wait", type=float, default=30.0,
                   help="seconds a silent worker keeps a job before it is delivered to another")
    p.add_argument("--max-deliver", type=int, default=5,
                   help="deliveries of one job before it goes to the dead letter (fails)")
    p.set_defaults(func=cmd_jobworker)

    p = sub.add_parser("controlplane", help="run a control-plane replica")
    _common(p, "127.0.0.1:9001")
    p.add_argument("--election-ttl", type=int, default=5,
                   help="leader lease TTL in seconds (failover takes about this long)")
    p.add_argument("--health-interval", type=float, default=1.0, help="seconds between checks")
    p.add_argument("--probe-interval", type=float, default=5.0,
                   help="seconds between one-token generation probes per server")
    p.add_argument("--health-timeout", type=float, default=1.0, help="deadline of a health check")
    p.add_argument("--probe-timeout", type=float, default=5.0, help="deadline of a probe")
    p.add_argument("--unhealthy-after", type=int, default=3, help="failed rounds to NOT_SERVING")
    p.add_argument("--healthy-after", type=int, default=2, help="good rounds back to SERVING")
    p.add_argument("--halt-after-failures", type=int, default=2,
                   help="stop placing a model once it failed to load on this many distinct "
                        "servers (0 = never); `meshctl model retry NAME` lifts the halt")
    p.add_argument("--autoscale-interval", type=float, default=1.0,
                   help="seconds between the leader's autoscaling decisions (signals are pulled "
                        "from servers and routers at this pace)")
    p.set_defaults(func=cmd_controlplane)

    p = sub.add_parser("openai-gateway", help="run the OpenAI-compatible HTTP API (a client of InferenceService)")
    _common(p, "127.0.0.1:8090")
    p.add_argument("--http", default="127.0.0.1:8080",
                   help="host:port of the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models); "
                        "--listen serves gRPC health and reflection")
    p.add_argument("--upstream", default="127.0.0.1:8000",
                   help="InferenceService to call: Envoy's host:port (its health checks, retries and rate "
                        "limit apply), or routers directly as a gRPC target (ipv4:H1:P1,H2:P2 or "
                        "dns:///routers:8001, balanced round robin)")
    p.add_argument("--slow-consumer-timeout", type=float, default=60.0,
                   help="cancel a streamed answer whose client read nothing for this many seconds")
    p.set_defaults(func=cmd_openai_gateway)

    p = sub.add_parser("envoy-config", help="print the rendered Envoy config")
    p.add_argument("--listen", default="0.0.0.0:8080")
    p.add_argument("--admin", default="127.0.0.1:9901")
    p.add_argument("--router", action="append", required=True, help="router host:port (repeatable)")
    p.add_argument("--gateway", action="append", default=[],
                   help="OpenAI gateway HTTP host:port (repeatable; none: the OpenAI paths answer 503)")
    p.add_argument("--descriptor", default="")
    p.add_argument("--cluster-type", default="STATIC", choices=["STATIC", "STRICT_DNS"])
    p.add_argument("--access-log", default="/dev/stdout")
    p.set_defaults(func=cmd_envoy_config)

    p = sub.add_parser("edge", help="render the Envoy config and run Envoy (the edge container)")
    from services.cli import edge
    edge.add_arguments(p)
    p.set_defaults(func=edge.run)

    p = sub.add_parser("up", help="start the local mesh: etcd, Envoy, control plane, router, servers")
    from services.cli.up import add_arguments
    add_arguments(p)
    p.set_defaults(func=cmd_up)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"meshserve: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
