"""Renders deploy/envoy/envoy.yaml.tmpl, the one Envoy config for local and Kubernetes use."""

from __future__ import annotations

import string
from dataclasses import dataclass
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


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    return host.strip("[]"), int(port)


def render(settings: EnvoySettings) -> str:
    if not settings.routers:
        raise ValueError("Envoy needs at least one router endpoint")
    if not Path(settings.descriptor).is_file():
        raise FileNotFoundError(
            f"proto descriptor {settings.descriptor} is missing; run `make gen` to build it")
    lines = []
    for router in settings.routers:
        host, port = _split(router)
        lines.append(
            f"        - endpoint:\n"
            f"            address:\n"
            f"              socket_address: {{ address: \"{host}\", port_value: {port} }}")
    listen_host, listen_port = _split(settings.listen)
    admin_host, admin_port = _split(settings.admin)
    return string.Template(TEMPLATE.read_text()).substitute(
        listen_host=f'"{listen_host}"', listen_port=listen_port,
        admin_host=f'"{admin_host}"', admin_port=admin_port,
        descriptor=str(settings.descriptor), cluster_type=settings.cluster_type,
        access_log=settings.access_log, router_endpoints="\n".join(lines))
