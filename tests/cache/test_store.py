"""The store wrapper against a real redis-server: bulk reads and writes, a store that is down or
full makes callers compute (never an error) and the metrics say so."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client import REGISTRY

from services.cache import runtime
from services.cache.store import Store
from tests.helpers import wait_for
from tests.redis_server import RedisServer


def _up() -> float:
    return REGISTRY.get_sample_value("meshserve_cache_store_up") or 0.0


def test_bulk_reads_writes_and_flush_by_pattern(store_url: str):
    store = runtime.store()
    assert store is not None
    assert store.set_many({"ms:kv1:aa:bb:01": b"x", "ms:kv1:aa:cc:02": b"y", "ms:resp1:aa:bb:03": b"z"})
    assert store.get_many(["ms:kv1:aa:bb:01", "missing", "ms:kv1:aa:cc:02"]) == [b"x", None, b"y"]
    assert store.delete_matching("ms:kv1:aa:bb:*") == 1
    assert store.get_many(["ms:kv1:aa:bb:01", "ms:resp1:aa:bb:03"]) == [None, b"z"]
    info = store.info()
    assert info["keys"] == 2 and info["max_bytes"] == 256 << 20
    assert _up() == 1.0


def test_a_store_that_is_down_answers_misses_and_backs_off(tmp_path: Path):
    server = RedisServer(tmp_path)  # never started: connection refused
    store = Store(server.url, timeout_s=0.5)
    assert store.get_many(["a", "b"]) == [None, None]
    assert not store.up and store.failures == 1 and _up() == 0.0
    assert not store.available()
    started = time.monotonic()
    assert store.get_many(["a"]) == [None]  # skipped during the back-off: no new failure, no wait
    assert store.failures == 1 and time.monotonic() - started < 0.1
    assert store.set_many({"a": b"1"}) is False
    server.start()
    try:
        wait_for(lambda: store.available(), 5, "the back-off to pass")
        assert store.set_many({"a": b"1"}) and store.up and _up() == 1.0
    finally:
        server.stop()


def test_a_full_store_drops_the_write_and_counts_it(tmp_path: Path):
    server = RedisServer(tmp_path, maxmemory=2 << 20)
    server.start()
    try:
        store = Store(server.url)
        assert store.set_many({"small": b"x" * 1000})
        assert store.set_many({"huge": b"x" * (8 << 20)}) is False  # larger than LRU can ever free
        assert store.full == 1 and store.up
        # LRU may have evicted everything trying to make room; the store keeps serving
        assert store.set_many({"after": b"y" * 1000})
        assert store.get_many(["after"]) == [b"y" * 1000]
    finally:
        server.stop()
