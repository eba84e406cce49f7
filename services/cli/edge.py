"""`meshserve edge`: render the Envoy config from deploy/envoy/envoy.yaml.tmpl and exec Envoy.

The edge container runs this (deploy/k8s), so the config Envoy runs is rendered at start from the
same template and settings the local mesh and the tests use, never a copy that can drift.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="0.0.0.0:8080", help="host:port of the public listener")
    p.add_argument("--admin", default="127.0.0.1:9901", help="admin interface (keep it on loopback)")
    p.add_argument("--router", action="append", required=True,
                   help="router host:port (repeatable; with --cluster-type STRICT_DNS one DNS name "
                        "that resolves to every router, e.g. a headless service)")
    p.add_argument("--gateway", action="append", default=[],
                   help="OpenAI gateway HTTP host:port (repeatable, or one DNS name with STRICT_DNS; none: "
                        "the OpenAI paths answer 503)")
    p.add_argument("--cluster-type", default="STRICT_DNS", choices=["STATIC", "STRICT_DNS"])
    p.add_argument("--descriptor", default="", help="proto descriptor set (default: the one `make gen` builds)")
    p.add_argument("--access-log", default="/dev/stdout")
    p.add_argument("--stats-listen", default="",
                   help="host:port serving only /ready and /stats/prometheus from admin (for probes "
                        "and scrapes from outside the pod)")
    p.add_argument("--otlp-traces-endpoint", default="", metavar="HOST:PORT",
                   help="OTLP/gRPC collector for Envoy's spans ('' = Envoy passes traceparent through)")
    p.add_argument("--config-out", default="/tmp/envoy.yaml", help="where the rendered config is written")
    p.add_argument("--drain-time-s", type=int, default=10, help="Envoy --drain-time-s on shutdown")
    p.add_argument("--log-level", default="warn")


def run(args: argparse.Namespace) -> int:
    from services.common.envoy_config import DEFAULT_DESCRIPTOR, EnvoySettings, render
    from services.localmesh.components import envoy_binary

    settings = EnvoySettings(
        listen=args.listen, admin=args.admin, routers=args.router, gateways=args.gateway,
        cluster_type=args.cluster_type,
        descriptor=Path(args.descriptor or DEFAULT_DESCRIPTOR), access_log=args.access_log,
        otlp_endpoint=args.otlp_traces_endpoint, stats_listen=args.stats_listen)
    config = Path(args.config_out)
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(render(settings))
    envoy = envoy_binary()
    # A container restarts rather than hot-restarts: no shared memory, so any number of edges can
    # run side by side on one host (the loopback test of the manifests does).
    os.execv(envoy, [envoy, "-c", str(config), "--disable-hot-restart", "--log-level", args.log_level,
                     "--drain-time-s", str(args.drain_time_s), "--drain-strategy", "immediate"])
    return 0  # not reached
