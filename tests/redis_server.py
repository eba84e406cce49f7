"""A real redis-server (Debian's 7.0, as `meshserve up` runs it) on a free loopback port, for the
shared-cache tests; stopped by PID by whoever started it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import redis

from services.common import ports
from services.localmesh import cache_store
from tests.helpers import wait_for


class RedisServer:
    def __init__(self, data_dir: Path, maxmemory: int = 256 << 20) -> None:
        self.address = f"127.0.0.1:{ports.free_port()}"
        self.url = cache_store.redis_url(self.address)
        self._argv = cache_store.redis_argv("127.0.0.1", int(self.address.rpartition(":")[2]), data_dir, maxmemory)
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        # through exec_child: the server dies with the test process even when that is killed
        self.proc = subprocess.Popen([sys.executable, "-m", "services.localmesh.exec_child", *self._argv],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def ready() -> bool:
            try:
                return cache_store.redis_ready(self.address)
            except redis.exceptions.RedisError:
                return False
        wait_for(ready, 20, "redis-server answering PING")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)
