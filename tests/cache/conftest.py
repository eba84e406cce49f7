"""Fixtures of the shared-cache tests: a real redis-server (Debian's 7.0, as `meshserve up` runs
it) on a free loopback port, flushed before each test, and the process-wide cache runtime."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from services.cache import runtime
from tests.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store_url(redis_server: RedisServer) -> Iterator[str]:
    """A flushed store configured as this process's shared cache; unset afterwards."""
    client = redis_server.client()
    client.flushall()
    client.close()
    runtime.configure(redis_server.url, secret="test-secret")
    try:
        yield redis_server.url
    finally:
        runtime.configure("")
