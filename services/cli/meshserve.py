"""`meshserve`: run one MeshServe service, or the whole local mesh (`meshserve up`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Awaitable, Callable

from services.cli import serve_args
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


Adder = Callable[[argparse.ArgumentParser], None]


def _commands() -> list[tuple[str, str, Adder, Callable[[argparse.Namespace], int]]]:
    """Each subcommand: name, help, its flags (serve_args.py) and what runs it."""
    from services.cli import edge

    return [
        ("modelserver", "run a model server", serve_args.modelserver, cmd_modelserver),
        ("router", "run a router", serve_args.router, cmd_router),
        ("jobworker", "run a job worker: jobs and batch lines on spare capacity", serve_args.jobworker,
         cmd_jobworker),
        ("controlplane", "run a control-plane replica", serve_args.controlplane, cmd_controlplane),
        ("openai-gateway", "run the OpenAI-compatible HTTP API (a client of InferenceService)",
         serve_args.openai_gateway, cmd_openai_gateway),
        ("envoy-config", "print the rendered Envoy config", serve_args.envoy_config, cmd_envoy_config),
        ("edge", "render the Envoy config and run Envoy (the edge container)", serve_args.edge, edge.run),
        ("up", "start the local mesh: etcd, Envoy, control plane, router, servers", serve_args.up, cmd_up),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, add_arguments, func in _commands():
        p = sub.add_parser(name, help=help_text)
        add_arguments(p)
        p.set_defaults(func=func)
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
