"""The shared cache's store process: Debian's redis-server 7.0 (make setup unpacks it into the
virtualenv), run with a memory limit and LRU eviction over every key, no persistence.

Why these settings: the cache holds only what can be recomputed, so `allkeys-lru` (evict the least
recently used entry of any kind when `maxmemory` is reached) is the right policy and snapshots to
disk would only cost I/O; a full store then evicts instead of refusing writes.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from services.common.tls import TlsFiles


def redis_binary() -> str:
    """The virtualenv's redis-server (make setup), else one on PATH."""
    local = Path(sys.executable).parent / "redis-server"
    if local.is_file():
        return str(local)
    found = shutil.which("redis-server")
    if not found:
        raise FileNotFoundError("no redis-server binary: `make setup` unpacks Debian's redis 7.0 into .venv/bin")
    return found


def redis_argv(host: str, port: int, data_dir: Path, maxmemory_bytes: int,
               tls: TlsFiles | None = None) -> list[str]:
    """With `tls`: only a TLS listener (`--port 0`), and a client certificate from the mesh CA."""
    data_dir.mkdir(parents=True, exist_ok=True)
    listen = ["--port", str(port)] if tls is None else [
        "--port", "0", "--tls-port", str(port), "--tls-cert-file", str(tls.cert),
        "--tls-key-file", str(tls.key), "--tls-ca-cert-file", str(tls.ca), "--tls-auth-clients", "yes"]
    return [redis_binary(), "--bind", host, *listen, "--save", "", "--appendonly", "no",
            "--maxmemory", str(maxmemory_bytes), "--maxmemory-policy", "allkeys-lru",
            "--notify-keyspace-events", "Ee",  # servers tell routers which KV blocks LRU evicted
            "--dir", str(data_dir), "--protected-mode", "yes", "--daemonize", "no", "--loglevel", "warning"]


def redis_url(address: str, secure: bool = False) -> str:
    return f"{'rediss' if secure else 'redis'}://{address}/0"


def redis_ready(address: str, tls: TlsFiles | None = None) -> bool:
    from services.cache.store import connect  # not at import time: redis-py pulls in opentelemetry

    client = connect(redis_url(address, tls is not None), 1.0, tls, max_connections=2)
    try:
        return bool(client.ping())
    finally:
        client.close()
