"""Requests for a model scaled to zero wait in the router (bounded, with their deadlines) until a
replica appears, and the router reports them to the autoscaler; other models without a replica
still fail at once. Uses the dispatch tests' fake servers (no gRPC, no etcd)."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest

from services.common.errors import DeadlineExceeded, Unavailable
from services.common.validation import validate_request
from services.router.load_servicer import RouterLoadServicer
from tests.unit.test_router_dispatch import MODEL, FakePool, FakeServer, ask, collect, dispatcher


class ZeroPool(FakePool):
    """A model scaled to zero: no candidates until `place()`."""

    def __init__(self) -> None:
        super().__init__({"a": FakeServer()})
        self.placed = False
        self.zero = True

    def candidates(self, model: str):
        return super().candidates(model) if self.placed else []

    def scales_from_zero(self, model: str) -> bool:
        return self.zero and model == MODEL

    def place(self) -> None:
        self.placed = True
        for f in self.listeners:
            f()


async def test_a_request_waits_for_the_first_replica_and_is_reported_meanwhile():
    pool = ZeroPool()
    d = dispatcher(pool)
    task = asyncio.create_task(collect(d, ask(), timeout=10))
    await asyncio.sleep(0.05)
    assert d.admission.waiting_for_replica(MODEL) == 1
    report = await RouterLoadServicer(d).GetRouterLoad(None, None)
    demand = {m.model: m for m in report.models}[MODEL]
    assert (demand.waiting_for_replica, demand.requests_total) == (1, 1)
    pool.place()
    chunks = await asyncio.wait_for(task, 5)
    assert "".join(c.text for c in chunks).startswith("a b c")
    assert d.admission.waiting_for_replica(MODEL) == 0


async def test_the_wait_ends_with_the_deadline_and_other_models_fail_at_once():
    pool = ZeroPool()
    d = dispatcher(pool)
    with pytest.raises(DeadlineExceeded, match="scaled to zero"):
        await collect(d, ask(), timeout=0.2)
    pool.zero = False
    with pytest.raises(Unavailable, match="no replica can take"):
        await collect(d, ask(), timeout=5)


async def test_the_wait_queue_is_bounded():
    d = dispatcher(ZeroPool(), queue_size=1)
    first = asyncio.create_task(collect(d, ask(), timeout=5))
    await asyncio.sleep(0.05)
    with pytest.raises(Unavailable, match="queue") as err:
        async for _ in d.stream(validate_request(ask()), 5, None):
            pass
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    first.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await first
