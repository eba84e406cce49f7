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
        rate_limit_enabled=100 if settings.rate_limit_per_s else 0)
