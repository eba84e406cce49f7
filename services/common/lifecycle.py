"""Process lifecycle shared by the services: signals to a stop event, wall-clock ids."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time


def install_stop_signals(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT ask for a graceful stop (drain, deregister, exit)."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def now_ms() -> int:
    return int(time.time() * 1000)


def default_id(kind: str) -> str:
    return f"{kind}-{socket.gethostname().split('.')[0]}-{os.getpid()}"


def parse_option(text: str) -> tuple[str, object]:
    """'key=value' with value read as int, float, bool or string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ValueError(f"option {text!r} is not key=value")
    value: object = raw
    for cast in (int, float):
        try:
            value = cast(raw)
            break
        except ValueError:
            continue
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    return key.replace("-", "_"), value
