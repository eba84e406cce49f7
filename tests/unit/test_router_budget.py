"""Retry budget, admission queue and client-visible usage after a migration."""

from __future__ import annotations

import asyncio

import pytest
from meshserve.v1 import common_pb2, modelserver_pb2

from services.router.admission import AdmissionQueue, QueueFull, QueueTimeout
from services.router.migration import client_usage, resume_request
from services.router.retry_budget import RetryBudget
from tests.helpers import until


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


async def test_admission_queue_is_fifo_bounded_and_times_out():
    q = AdmissionQueue(limit=2)
    room = [False]
    order: list[str] = []

    async def waiter(name: str) -> None:
        await q.wait(lambda: room[0], 5)
        order.append(name)
        room[0] = False  # it took the room

    first = asyncio.create_task(waiter("first"))
    await until(lambda: len(q) == 1, 5, "the first waiter to queue")
    second = asyncio.create_task(waiter("second"))
    await until(lambda: len(q) == 2, 5, "the second waiter to queue")
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


def test_client_usage_counts_the_whole_answer_for_every_engine():
    u = common_pb2.Usage(prompt_tokens=5, completion_tokens=4)
    assert client_usage(u, "sim", 0) is u
    assert client_usage(u, "sim", 3).completion_tokens == 7  # sim counts only its own tokens
    torch_usage = common_pb2.Usage(prompt_tokens=5, completion_tokens=7)
    assert client_usage(torch_usage, "torch", 3).completion_tokens == 7  # torch includes them
    assert client_usage(torch_usage, "tensorrt_llm", 3).prompt_tokens == 5


def test_resume_request_copies_everything_and_sets_the_tokens():
    base = modelserver_pb2.ModelServerServiceGenerateRequest(request_id="r", model="m", prompt="p")
    base.sampling.max_tokens = 9
    out = resume_request(base, [1, 2])
    assert list(out.resume_token_ids) == [1, 2] and out.sampling.max_tokens == 9
    assert not base.resume_token_ids
