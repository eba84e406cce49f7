"""Which TCP ports a MeshServe process may listen on, probed the way the servers bind them.

Two rules, both learnt the hard way:
- Probe like the real listener. gRPC, Envoy, etcd (Go) and the Prometheus HTTP server all listen
  with SO_REUSEADDR, so on Linux a port still held by TIME_WAIT / FIN_WAIT connections of a killed
  or stopped process is free for them; only another *listener* makes it taken. A probe without
  SO_REUSEADDR refuses such a port for the whole TIME_WAIT period (40-75 s observed).
- Pick free ports outside the OS's ephemeral range (ip_local_port_range): ports from there, e.g.
  from bind(port 0), can be taken by any outgoing connection between the pick and the real bind.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
from pathlib import Path

log = logging.getLogger(__name__)

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: Linux's default, used when the file cannot be read.
DEFAULT_EPHEMERAL = (32768, 60999)
#: Free ports are picked from here minus the ephemeral range. It starts above the local mesh's
#: default block (18000-18299) so tests never collide with a running `meshserve up`.
PICK_RANGE = (20000, 65535)


class PortInUseError(RuntimeError):
    pass


def ephemeral_range() -> tuple[int, int]:
    """The range the kernel picks source ports of outgoing connections from."""
    try:
        low, high = (int(v) for v in EPHEMERAL_RANGE_FILE.read_text().split())
        return low, high
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def in_ephemeral_range(port: int) -> bool:
    low, high = ephemeral_range()
    return low <= port <= high


def listen_error(host: str, port: int) -> OSError | None:
    """Bind and listen as the servers do (SO_REUSEADDR, no SO_REUSEPORT); the error, or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            s.listen(1)
        except OSError as exc:
            return exc
    return None


def port_free(host: str, port: int) -> bool:
    return listen_error(host, port) is None


def check_port_free(host: str, port: int) -> None:
    """Raise PortInUseError with an actionable message when a listener holds host:port."""
    exc = listen_error(host, port)
    if exc is not None:
        raise PortInUseError(
            f"port {port} on {host} is already in use ({exc.strerror}); stop whatever holds it "
            f"(e.g. `ss -ltnp 'sport = :{port}'`) or choose another port")


class _Picker:
    """Hands out ports in sequence from a random start, so two processes picking at once (tests
    run in parallel on one host) collide only if their runs of ports overlap."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cursor: int | None = None

    def candidates(self) -> list[int]:
        low, high = ephemeral_range()
        return [p for p in range(PICK_RANGE[0], PICK_RANGE[1] + 1) if not low <= p <= high]

    def pick(self, host: str, count: int) -> int:
        """The first port of `count` consecutive free ports outside the ephemeral range."""
        ports = self.candidates()
        allowed = set(ports)
        with self._lock:
            if self._cursor is None:
                self._cursor = random.randrange(len(ports)) if ports else 0
            for step in range(len(ports)):
                first = ports[(self._cursor + step) % len(ports)]
                run = range(first, first + count)
                if all(p in allowed for p in run) and all(port_free(host, p) for p in run):
                    self._cursor = (self._cursor + step + count) % len(ports)
                    return first
        return 0


_picker = _Picker()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on, outside the ephemeral range (port 0 semantics otherwise)."""
    return free_port_block(1, host)


def free_port_block(count: int, host: str = "127.0.0.1") -> int:
    """The first of `count` consecutive free ports outside the ephemeral range (a base port)."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    port = _picker.pick(host, count)
    if port:
        return port
    if count > 1:
        raise PortInUseError(f"no {count} consecutive free ports outside the ephemeral range "
                             f"{ephemeral_range()} on {host}")
    log.warning("no free port outside the ephemeral range %s; letting the OS pick one",
                ephemeral_range())
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
