"""The command line of each `meshserve` service: its flags and their help, one function per
service (meshserve.py maps each to the code that runs it)."""

from __future__ import annotations

import argparse


def common(p: argparse.ArgumentParser, listen: str) -> None:
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


def jetstream(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--jetstream", default="", metavar="HOST:PORT,...", help=what)
    p.add_argument("--jetstream-replicas", type=int, default=1,
                   help="copies of each stream and bucket when they are created (3 on a 3-node cluster)")



def modelserver(p: argparse.ArgumentParser) -> None:
    common(p, "127.0.0.1:7001")
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


def router(p: argparse.ArgumentParser) -> None:
    common(p, "127.0.0.1:8001")
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
    jetstream(p, "serve JobService (jobs and batches) from these JetStream servers (empty: not served)")


def jobworker(p: argparse.ArgumentParser) -> None:
    common(p, "127.0.0.1:0")
    jetstream(p, "the JetStream servers holding jobs and batches (required)")
    p.add_argument("--fill", type=float, default=0.5,
                   help="background work fills a replica only up to this share of its running capacity")
    p.add_argument("--max-in-flight", type=int, default=64, help="generations in flight in this worker")
    p.add_argument("--ack-wait", type=float, default=30.0,
                   help="seconds a silent worker keeps a job before it is delivered to another")
    p.add_argument("--max-deliver", type=int, default=5,
                   help="deliveries of one job before it goes to the dead letter (fails)")


def controlplane(p: argparse.ArgumentParser) -> None:
    common(p, "127.0.0.1:9001")
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


def openai_gateway(p: argparse.ArgumentParser) -> None:
    common(p, "127.0.0.1:8090")
    p.add_argument("--http", default="127.0.0.1:8080",
                   help="host:port of the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models); "
                        "--listen serves gRPC health and reflection")
    p.add_argument("--upstream", default="127.0.0.1:8000",
                   help="InferenceService to call: Envoy's host:port (its health checks, retries and rate "
                        "limit apply), or routers directly as a gRPC target (ipv4:H1:P1,H2:P2 or "
                        "dns:///routers:8001, balanced round robin)")
    p.add_argument("--slow-consumer-timeout", type=float, default=60.0,
                   help="cancel a streamed answer whose client read nothing for this many seconds")


def envoy_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--listen", default="0.0.0.0:8080")
    p.add_argument("--admin", default="127.0.0.1:9901")
    p.add_argument("--router", action="append", required=True, help="router host:port (repeatable)")
    p.add_argument("--gateway", action="append", default=[],
                   help="OpenAI gateway HTTP host:port (repeatable; none: the OpenAI paths answer 503)")
    p.add_argument("--descriptor", default="")
    p.add_argument("--cluster-type", default="STATIC", choices=["STATIC", "STRICT_DNS"])
    p.add_argument("--access-log", default="/dev/stdout")


def edge(p: argparse.ArgumentParser) -> None:
    from services.cli import edge as edge_cli

    edge_cli.add_arguments(p)


def up(p: argparse.ArgumentParser) -> None:
    from services.cli.up import add_arguments

    add_arguments(p)
