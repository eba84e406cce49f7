"""Cache figures per model and tier, kept as plain counters (meshctl cache stats reads them) and
mirrored into Prometheus (defined once per process).

Tiers: `local` (the engine's KV pool, prefix hits), `shared` (KV blocks in the shared store),
`response` (whole answers). Hits and misses count blocks for the KV tiers, answers for `response`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge

HITS = Counter("meshserve_cache_hits_total", "Cache hits (KV blocks, or answers for tier=response)",
               ["model", "tier"])
MISSES = Counter("meshserve_cache_misses_total", "Cache look-ups that found nothing usable", ["model", "tier"])
HIT_RATE = Gauge("meshserve_cache_hit_rate", "Hits / look-ups since start", ["model", "tier"])
BYTES_READ = Counter("meshserve_cache_read_bytes_total", "Bytes read from a cache tier", ["model", "tier"])
BYTES_WRITTEN = Counter("meshserve_cache_written_bytes_total", "Bytes written to a cache tier", ["model", "tier"])
EVICTIONS = Counter("meshserve_cache_evictions_total",
                    "Entries evicted (local: pool blocks reused; shared: see meshserve_cache_store_evicted_keys)",
                    ["model", "tier"])
ERRORS = Counter("meshserve_cache_errors_total",
                 "Cache operations that failed and fell back to computing (store down or full, block "
                 "that did not verify, write dropped)", ["model", "tier", "reason"])
STORE_UP = Gauge("meshserve_cache_store_up", "1 when the shared store answers, 0 while it is down or unset")
STORE_USED = Gauge("meshserve_cache_store_used_bytes", "Memory the shared store uses (its INFO)")
STORE_MAX = Gauge("meshserve_cache_store_max_bytes", "The shared store's maxmemory")
STORE_EVICTED = Gauge("meshserve_cache_store_evicted_keys", "Keys the shared store evicted since it started")
STORE_KEYS = Gauge("meshserve_cache_store_keys", "Keys in the shared store")

TIERS = ("local", "shared", "response")


@dataclass
class TierStats:
    model: str
    tier: str
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    evictions: int = 0
    errors: int = 0
    blocks: int = 0  # entries this tier holds now, where known
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        for metric in (HITS, MISSES, BYTES_READ, BYTES_WRITTEN, EVICTIONS):
            metric.labels(self.model, self.tier)  # series exist at zero from the start

    def _rate(self) -> None:
        total = self.hits + self.misses
        HIT_RATE.labels(self.model, self.tier).set(self.hits / total if total else 0.0)

    def hit(self, n: int = 1, nbytes: int = 0) -> None:
        with self._lock:
            self.hits += n
            self.bytes_read += nbytes
            self._rate()
        HITS.labels(self.model, self.tier).inc(n)
        if nbytes:
            BYTES_READ.labels(self.model, self.tier).inc(nbytes)

    def miss(self, n: int = 1) -> None:
        with self._lock:
            self.misses += n
            self._rate()
        MISSES.labels(self.model, self.tier).inc(n)

    def wrote(self, nbytes: int) -> None:
        with self._lock:
            self.bytes_written += nbytes
        BYTES_WRITTEN.labels(self.model, self.tier).inc(nbytes)

    def evicted(self, n: int = 1) -> None:
        with self._lock:
            self.evictions += n
        EVICTIONS.labels(self.model, self.tier).inc(n)

    def error(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self.errors += n
        ERRORS.labels(self.model, self.tier, reason).inc(n)


_registry: dict[tuple[str, str], TierStats] = {}
_registry_lock = threading.Lock()


def tier_stats(model: str, tier: str) -> TierStats:
    """The one TierStats of (model, tier) in this process (an engine reloaded keeps counting)."""
    with _registry_lock:
        stats = _registry.get((model, tier))
        if stats is None:
            stats = _registry[(model, tier)] = TierStats(model, tier)
        return stats


def model_stats(model: str) -> list[TierStats]:
    with _registry_lock:
        return [s for (m, _), s in sorted(_registry.items()) if m == model]
