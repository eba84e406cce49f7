"""Tenant quotas as plain values: shares per router, refill, usage charged after the answer."""

from __future__ import annotations

from typing import Any

import pytest
from meshserve.v1 import auth_pb2

from services.common import keyspace
from services.common.auth_records import KeySet
from services.common.errors import ResourceExhausted
from services.router.quota import TenantQuotas


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def quotas(routers: list[int], **limits: Any) -> tuple[TenantQuotas, Clock]:
    keys = KeySet()
    keys.apply(keyspace.tenant_key("t"), keyspace.encode(auth_pb2.Tenant(name="t", models=["*"], **limits)))
    clock = Clock()
    return TenantQuotas(keys, routers=lambda: routers[0], clock=clock), clock


def admitted(q: TenantQuotas, n: int) -> int:
    count = 0
    for _ in range(n):
        try:
            q.admit("t")
            count += 1
        except ResourceExhausted:
            pass
    return count


def test_each_router_holds_an_equal_share_of_the_requests_per_second() -> None:
    routers = [2]
    q, clock = quotas(routers, requests_per_second=10)
    assert admitted(q, 20) == 5
    clock.now += 0.5
    assert admitted(q, 20) == 2  # 5/s share refills 2.5 in half a second
    routers[0] = 1  # the other router left: this one takes the whole quota
    clock.now += 1.0
    assert admitted(q, 20) == 10


def test_tokens_are_charged_after_the_answer_and_refusals_say_when_to_retry() -> None:
    q, clock = quotas([1], tokens_per_minute=60)  # 1 token/s, bucket of 60
    q.admit("t")
    q.charge("t", 50, 30)  # 20 tokens of debt
    with pytest.raises(ResourceExhausted) as err:
        q.admit("t")
    assert dict(err.value.trailers)["retry-after-ms"] == "21000"
    clock.now += 21
    q.admit("t")


def test_unlimited_and_unknown_tenants_pass() -> None:
    q, _ = quotas([3])
    assert admitted(q, 1000) == 1000
    q.admit("nobody")
