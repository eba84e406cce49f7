"""Renders deploy/envoy/envoy.yaml.tmpl, the one Envoy config for local and Kubernetes use."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "envoy" / "envoy.yaml.tmpl"
DEFAULT_DESCRIPTOR = Path(__file__).resolve().parents[2] / "build" / "meshserve.pb"


@dataclass
class EnvoySettings:
    listen: str  # host:port of the public listener
    admin: str  # host:port of the admin interface (keep it on loopback)
    routers: list[str]  # host:port of each router (or one DNS name with cluster_type STRICT_DNS)
    descriptor: Path = DEFAULT_DESCRIPTOR
    cluster_type: str = "STATIC"
    access_log: str = "/dev/stdout"
    #: Edge rate limit for the whole listener, requests per second (0 = off). The default is far
    #: above what one host serves, so tests and benchmarks are never throttled by accident.
    rate_limit_per_s: int = 100_000
    #: Requests allowed in a burst (0 = rate_limit_per_s).
    rate_limit_burst: int = 0
    #: Route requests with the same session header to the same router (ring hash) instead of
    #: least-request. Routers already agree on a session's server through etcd, so this only
    #: saves the extra work of a random router; off by default.
    session_ring_hash: bool = False
    session_header: str = "x-session-id"
    #: OTLP/gRPC collector (host:port, an http:// prefix is dropped) for Envoy's own spans; ''
    #: = Envoy does not trace and passes a client's traceparent through untouched.
    otlp_endpoint: str = ""
    #: host:port of a listener that serves only /ready and /stats/prometheus from the admin
    #: interface, for probes and scrapes from outside the pod ('' = none; admin stays on loopback).
    stats_listen: str = ""
    #: host:port of each OpenAI gateway's HTTP listener (or one DNS name with STRICT_DNS). Empty:
    #: the OpenAI paths answer 503 in OpenAI's error shape.
    gateways: list[str] = field(default_factory=list)


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def _hash_policy(settings: EnvoySettings) -> str:
    if not settings.session_ring_hash:
        return ""
    header = settings.session_header
    if not header or header != header.lower() or any(c in header for c in ' :"\n'):
        raise ValueError(f"session_header {header!r} must be a lower-case header name")
    return ("                  hash_policy:\n"
            f"                  - header: {{ header_name: \"{header}\" }}\n")


_TRACING = """\
          tracing:
            provider:
              name: envoy.tracers.opentelemetry
              typed_config:
                "@type": type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig
                grpc_service:
                  envoy_grpc: { cluster_name: otlp_collector }
                  timeout: 1s
                service_name: meshserve-envoy
"""

_OTLP_CLUSTER = """\
  - name: otlp_collector
    type: STRICT_DNS
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
    load_assignment:
      cluster_name: otlp_collector
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: "$host", port_value: $port } } }
"""

# Only the two admin paths a kubelet probe and Prometheus need; the rest of admin (config dump,
# /quitquitquit) stays on loopback.
_STATS_LISTENER = """\
  - name: stats
    address:
      socket_address: { address: "$host", port_value: $port }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: stats
          route_config:
            name: stats
            virtual_hosts:
            - name: stats
              domains: ["*"]
              routes:
              - match: { path: "/ready" }
                route: { cluster: envoy_admin }
              - match: { path: "/stats/prometheus" }
                route: { cluster: envoy_admin }
              - match: { prefix: "/" }
                direct_response: { status: 404 }
          http_filters:
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

_ADMIN_CLUSTER = """\
  - name: envoy_admin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: envoy_admin
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: "$host", port_value: $port } } }
"""


def _optional_parts(settings: EnvoySettings) -> dict[str, str]:
    """Tracing and the stats listener: present only when configured."""
    parts = {"tracing": "", "stats_listener": "", "extra_clusters": ""}
    if settings.otlp_endpoint:
        host, port = _split(settings.otlp_endpoint.removeprefix("http://"))
        parts["tracing"] = _TRACING
        parts["extra_clusters"] += string.Template(_OTLP_CLUSTER).substitute(host=host, port=port)
    if settings.stats_listen:
        host, port = _split(settings.stats_listen)
        admin_host, admin_port = _split(settings.admin)
        if admin_host in ("0.0.0.0", "::"):
            admin_host = "127.0.0.1"
        parts["stats_listener"] = string.Template(_STATS_LISTENER).substitute(host=host, port=port)
        parts["extra_clusters"] += string.Template(_ADMIN_CLUSTER).substitute(host=admin_host,
                                                                              port=admin_port)
    return parts


def _endpoints(addresses: list[str]) -> str:
    lines = []
    for address in addresses:
        host, port = _split(address)
        lines.append(
            f"        - endpoint:\n"
            f"            address:\n"
            f"              socket_address: {{ address: \"{host}\", port_value: {port} }}")
    return "\n".join(lines)


def render(settings: EnvoySettings) -> str:
    if not settings.routers:
        raise ValueError("Envoy needs at least one router endpoint")
    if settings.rate_limit_per_s < 0 or settings.rate_limit_burst < 0:
        raise ValueError("rate_limit_per_s and rate_limit_burst must be >= 0 (0 = off / same)")
    if not Path(settings.descriptor).is_file():
        raise FileNotFoundError(
            f"proto descriptor {settings.descriptor} is missing; run `make gen` to build it")
    gateways = "\n" + _endpoints(settings.gateways) if settings.gateways else "[]"
    listen_host, listen_port = _split(settings.listen)
    admin_host, admin_port = _split(settings.admin)
    return string.Template(TEMPLATE.read_text()).substitute(
        listen_host=f'"{listen_host}"', listen_port=listen_port,
        admin_host=f'"{admin_host}"', admin_port=admin_port,
        descriptor=str(settings.descriptor), cluster_type=settings.cluster_type,
        access_log=settings.access_log, router_endpoints=_endpoints(settings.routers),
        gateway_endpoints=gateways,
        hash_policy=_hash_policy(settings),
        lb_policy="RING_HASH" if settings.session_ring_hash else "LEAST_REQUEST",
        rate_limit_per_s=max(1, settings.rate_limit_per_s),
        rate_limit_burst=max(1, settings.rate_limit_burst or settings.rate_limit_per_s),
        rate_limit_enabled=100 if settings.rate_limit_per_s else 0, **_optional_parts(settings))
