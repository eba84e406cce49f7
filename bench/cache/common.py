"""What the cache benchmark's phases share: a redis-server process, prompts, percentiles."""

from __future__ import annotations

import random
import subprocess
import time
from pathlib import Path

import redis

from services.common import ports
from services.localmesh import cache_store

WORDS = ("river", "mountain", "orchard", "ledger", "harbour", "lantern", "copper", "meadow", "signal",
         "archive", "bridge", "canvas", "quarry", "falcon", "timber", "glacier", "compass", "velvet", "engine",
         "marble", "tunnel", "summit", "beacon")


def text_of(n_words: int, seed: int) -> str:
    """Deterministic prose-like text; about 1.3 tokens per word with SmolLM2's tokenizer."""
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) + ("." if i % 12 == 11 else "") for i in range(n_words))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


class RedisProcess:
    """redis-server as `meshserve up` runs it, on a free loopback port, stopped by PID."""

    def __init__(self, data_dir: Path, maxmemory: int) -> None:
        port = ports.free_port()
        self.address = f"127.0.0.1:{port}"
        self.url = cache_store.redis_url(self.address)
        self._argv = cache_store.redis_argv("127.0.0.1", port, data_dir, maxmemory)
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> RedisProcess:
        self.proc = subprocess.Popen(self._argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            try:
                if cache_store.redis_ready(self.address):
                    return self
            except redis.exceptions.RedisError:
                if time.monotonic() > deadline:
                    raise
            time.sleep(0.1)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def flush(self) -> None:
        client = redis.Redis.from_url(self.url)
        client.flushall()
        client.close()
