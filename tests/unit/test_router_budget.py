"""Retry budget (a ratio plus a floor, one spend per dying server) and the admission queue."""

from __future__ import annotations

import asyncio

import pytest

from services.router.admission import AdmissionQueue, QueueFull, QueueTimeout
from services.router.retry_budget import RetryBudget


def test_retry_budget_is_a_ratio_plus_floor_over_a_window():
    now = [0.0]
    b = RetryBudget(ratio=0.2, floor=2, window_s=10, clock=lambda: now[0])
    assert [b.try_spend() for _ in range(3)] == [True, True, False]
    for _ in range(10):
        b.request()
    assert [b.try_spend() for _ in range(3)] == [True, True, False]  # 2 + 0.2 x 10 = 4
    now[0] = 11.0  # the window moved on: only the floor again
    assert [b.try_spend() for _ in range(3)] == [True, True, False]
    with pytest.raises(ValueError):
        RetryBudget(window_s=0)


def test_failures_of_one_dying_server_spend_once_per_episode():
    now = [0.0]
    b = RetryBudget(ratio=0.0, floor=2, window_s=10, episode_s=5, clock=lambda: now[0])
    # 26 streams of one killed server fail together: the first pays, the rest ride along.
    assert all(b.try_spend("server-1") for _ in range(26))
    assert b.correlated == 25
    # A second dying server is a second failure, and the budget still bounds a storm of them.
    assert b.try_spend("server-2")
    assert not b.try_spend("server-3")
    assert not b.try_spend()  # failures servers answer while alive pay one by one
    now[0] = 6.0  # the episode is over: server-1 failing again is a new failure
    assert not b.try_spend("server-1")


async def test_admission_queue_is_fifo_bounded_and_times_out():
    q = AdmissionQueue(limit=2)
    room = [False]
    order: list[str] = []

    async def waiter(name: str) -> None:
        await q.wait(lambda: room[0], 5)
        order.append(name)
        room[0] = False  # it took the room

    first = asyncio.create_task(waiter("first"))
    await asyncio.sleep(0)
    second = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0.01)
    with pytest.raises(QueueFull):
        await q.wait(lambda: True, 1)
    room[0] = True
    q.notify()
    await asyncio.wait_for(first, 1)
    assert order == ["first"] and not second.done()
    room[0] = True
    q.notify()
    await asyncio.wait_for(second, 1)
    assert order == ["first", "second"] and len(q) == 0
    with pytest.raises(QueueTimeout):
        await q.wait(lambda: False, 0.05)
