"""Per-tenant quotas at the routers: requests per second and tokens per minute, for the whole mesh.

How replicas stay consistent without a shared counter on the request path: each router enforces
an equal share, limit / (routers in membership), with its own token buckets. The shares add up
to the limit at every moment, so a burst spread over any number of routers is admitted at most
`limit` (plus what refills meanwhile); no request waits on etcd and a router cut off from etcd
keeps enforcing its last share. The price: when Envoy spreads a tenant's traffic unevenly, a
router may refuse while another has room (Envoy's least-request keeps that small). When
membership changes, every share is rescaled at the next request.

Tokens are counted from real usage (prompt + completion as the model server reported them):
a request is admitted while the tenant's token bucket holds at least one token, and its usage
is charged when it ends, so the bucket may go below zero and later requests wait until it has
refilled. Refusals are RESOURCE_EXHAUSTED with `retry after N ms` and a `retry-after-ms` trailer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter

from services.common.auth_records import KeySet
from services.common.errors import ResourceExhausted

TENANT_REQUESTS = Counter("meshserve_router_tenant_requests_total",
                          "Requests of each tenant admitted or refused by quota", ["tenant", "outcome"])
TENANT_TOKENS = Counter("meshserve_router_tenant_tokens_total",
                        "Tokens each tenant used, from the answers' usage", ["tenant", "kind"])


@dataclass
class Bucket:
    """A token bucket: `rate` tokens per second up to `capacity`; may be overdrawn (debt)."""

    rate: float
    capacity: float
    level: float
    stamp: float

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def rescale(self, rate: float, capacity: float, now: float) -> None:
        self.refill(now)
        self.level = min(capacity, self.level * (capacity / self.capacity if self.capacity else 1.0))
        self.rate, self.capacity = rate, capacity

    def wait_ms(self, need: float) -> int:
        """Milliseconds until the bucket holds `need` (0 when it already does)."""
        if self.level >= need:
            return 0
        return max(1, math.ceil((need - self.level) / self.rate * 1000))


class TenantQuotas:
    def __init__(self, keys: KeySet, routers: Callable[[], int],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._keys = keys
        self._routers = routers
        self._clock = clock
        self._buckets: dict[tuple[str, str], Bucket] = {}

    def _bucket(self, tenant: str, kind: str, limit_per_s: float, burst_s: float) -> Bucket | None:
        """This router's share of a limit (None when unlimited)."""
        if limit_per_s <= 0:
            self._buckets.pop((tenant, kind), None)
            return None
        now = self._clock()
        share = limit_per_s / max(1, self._routers())
        capacity = max(1.0, share * burst_s)
        bucket = self._buckets.get((tenant, kind))
        if bucket is None:
            bucket = self._buckets[(tenant, kind)] = Bucket(share, capacity, capacity, now)
        elif bucket.rate != share or bucket.capacity != capacity:
            bucket.rescale(share, capacity, now)
        else:
            bucket.refill(now)
        return bucket

    def admit(self, tenant: str) -> None:
        """Take one request from the tenant's share, or ResourceExhausted with retry-after."""
        record = self._keys.tenants.get(tenant)
        if record is None:
            return
        requests = self._bucket(tenant, "requests", record.requests_per_second, 1.0)
        tokens = self._bucket(tenant, "tokens", record.tokens_per_minute / 60.0, 60.0)
        for kind, bucket in (("requests/s", requests), ("tokens/min", tokens)):
            if bucket is None:
                continue
            wait = bucket.wait_ms(1.0)
            if wait:
                TENANT_REQUESTS.labels(tenant, "quota_" + kind.partition("/")[0]).inc()
                raise ResourceExhausted(f"tenant {tenant} is over its {kind} quota; retry after {wait} ms",
                                        retry_after_ms=wait)
        if requests is not None:
            requests.level -= 1.0
        TENANT_REQUESTS.labels(tenant, "admitted").inc()

    def charge(self, tenant: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Usage of a finished answer: counted, and taken from the tenant's token share."""
        TENANT_TOKENS.labels(tenant, "prompt").inc(max(0, prompt_tokens))
        TENANT_TOKENS.labels(tenant, "completion").inc(max(0, completion_tokens))
        bucket = self._buckets.get((tenant, "tokens"))
        if bucket is not None:
            bucket.refill(self._clock())
            bucket.level -= max(0, prompt_tokens) + max(0, completion_tokens)
