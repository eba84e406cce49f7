"""The shared store (Valkey/Redis) as the cache sees it: a few bulk operations that never raise.

Every call is bounded by a short socket timeout. A store that fails is marked down and skipped for
a back-off (1 s doubling to 15 s), so a dead store costs each request nothing rather than a
timeout; the callers then compute as if the entry were missing. A store that is full answers OOM
to writes (with `allkeys-lru` that only happens for a value larger than what eviction can free):
the write is dropped and counted. `up` and the counters say so in metrics.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from services.common.tls import TlsFiles

from . import metrics

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

T = TypeVar("T")
_MIN_BACKOFF_S, _MAX_BACKOFF_S = 1.0, 15.0


def connect(url: str, timeout_s: float, tls: TlsFiles | None, max_connections: int = 32) -> redis.Redis:
    """A client for `url`; with `tls` (a rediss:// store) it presents that certificate and trusts
    only the mesh CA. Imported here: redis-py imports opentelemetry when it can, which a process
    without a store (and without tracing) must not pay for (tests/unit/test_tracing_hooks.py)."""
    import redis

    extra: dict[str, Any] = {}
    if tls is not None:
        extra = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key), "ssl_ca_certs": str(tls.ca),
                 "ssl_cert_reqs": "required"}
    return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                max_connections=max_connections, **extra)


class Store:
    def __init__(self, url: str, timeout_s: float = 1.0, tls: TlsFiles | None = None) -> None:
        import redis

        self._errors = redis.exceptions
        self.url = url
        self._client = connect(url, timeout_s, tls)
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._backoff = _MIN_BACKOFF_S
        self.up = True
        self.failures = 0
        self.full = 0
        metrics.STORE_UP.set(1)

    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def _ok(self) -> None:
        if not self.up:
            log.info("shared cache store %s answers again", self.url)
        with self._lock:
            self.up, self._backoff = True, _MIN_BACKOFF_S
        metrics.STORE_UP.set(1)

    def _failed(self, e: Exception) -> None:
        with self._lock:
            self.failures += 1
            if self.up:
                log.warning("shared cache store %s failed (%s): computing without it for %.0fs", self.url, e,
                            self._backoff)
            self.up = False
            self._down_until = time.monotonic() + self._backoff
            self._backoff = min(self._backoff * 2, _MAX_BACKOFF_S)
        metrics.STORE_UP.set(0)

    def _call(self, fn: Callable[[redis.Redis], T], default: T) -> T:
        if not self.available():
            return default
        try:
            out = fn(self._client)
        except self._errors.ResponseError as e:
            if isinstance(e, self._errors.OutOfMemoryError) or "maxmemory" in str(e):
                self.full += 1
                self._ok()
                return default
            self._failed(e)
            return default
        except (self._errors.RedisError, OSError) as e:
            self._failed(e)
            return default
        self._ok()
        return out

    # ---- operations ----------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """Values of `keys` (None where missing); all None when the store is down."""
        if not keys:
            return []
        got: list[Any] | None = self._call(lambda c: c.mget(list(keys)), None)
        if got is None:
            return [None] * len(keys)
        return [v if isinstance(v, bytes) or v is None else str(v).encode() for v in got]

    def set_many(self, items: Mapping[str, bytes | bytearray]) -> bool:
        """Write entries in one round trip; False when the store is down or full (nothing to retry)."""
        if not items:
            return True

        def write(c: redis.Redis) -> bool:
            pipe = c.pipeline(transaction=False)
            for key, value in items.items():
                pipe.set(key, value)
            pipe.execute()
            return True
        full_before = self.full
        return self._call(write, False) and self.full == full_before

    def exists_many(self, keys: Sequence[str]) -> list[bool]:
        def check(c: redis.Redis) -> list[bool]:
            pipe = c.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return [bool(x) for x in pipe.execute()]
        return self._call(check, [False] * len(keys))

    def delete_matching(self, pattern: str) -> int:
        """Unlink every key matching `pattern` (SCAN, never KEYS: the store keeps serving)."""
        def scan(c: redis.Redis) -> int:
            n = 0
            batch: list[Any] = []
            for key in c.scan_iter(match=pattern, count=1000):
                batch.append(key)
                if len(batch) >= 500:
                    n += int(c.unlink(*batch))
                    batch = []
            if batch:
                n += int(c.unlink(*batch))
            return n
        return self._call(scan, 0)

    def info(self) -> dict[str, int]:
        """Memory, limit, keys and evictions from INFO; {} when down. Also sets the store gauges."""
        def read(c: redis.Redis) -> dict[str, int]:
            mem, stats, keyspace = c.info("memory"), c.info("stats"), c.info("keyspace")
            keys = sum(int(db.get("keys", 0)) for db in keyspace.values() if isinstance(db, dict))
            return {"used_bytes": int(mem.get("used_memory", 0)), "max_bytes": int(mem.get("maxmemory", 0)),
                    "evicted_keys": int(stats.get("evicted_keys", 0)), "keys": keys}
        empty: dict[str, int] = {}
        out = self._call(read, empty)
        if out:
            metrics.STORE_USED.set(out["used_bytes"])
            metrics.STORE_MAX.set(out["max_bytes"])
            metrics.STORE_EVICTED.set(out["evicted_keys"])
            metrics.STORE_KEYS.set(out["keys"])
        return out

    def watch_evictions(self, on_keys: Callable[[list[str]], None], stop: threading.Event) -> None:
        """Pass the names the store evicts to `on_keys` until `stop` (keyspace notifications, which
        `meshserve up` enables; asked for here too when the store has none). Reconnects after a
        failure; what is evicted meanwhile is learnt later from a fetch that misses."""
        db = int(self._client.connection_pool.connection_kwargs.get("db", 0))
        while not stop.is_set():
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                with contextlib.suppress(self._errors.ResponseError):  # a managed store may refuse CONFIG
                    if not self._client.config_get("notify-keyspace-events").get("notify-keyspace-events"):
                        self._client.config_set("notify-keyspace-events", "Ee")
                pubsub.subscribe(f"__keyevent@{db}__:evicted")
                while not stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if msg is not None and msg.get("type") == "message":
                        data = msg["data"]
                        on_keys([data.decode() if isinstance(data, bytes) else str(data)])
            except Exception as e:  # noqa: BLE001 - a store that fails or closes must not end the thread
                if not stop.is_set():
                    log.debug("eviction notifications from %s interrupted: %s", self.url, e)
                stop.wait(_MIN_BACKOFF_S)
            finally:
                with contextlib.suppress(Exception):
                    pubsub.close()

    def close(self) -> None:
        self._client.close()
