"""The simulated engine: deterministic echo, batching limits, priorities, cancellation."""

import asyncio

import pytest

from services.common.errors import InvalidArgument
from services.modelserver.engine.base import (
    CapacityError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    Priority,
    SamplingParams,
)
from services.modelserver.engine.sim import SimConfig, SimEngine


def run(coro):
    return asyncio.run(coro)


async def collect(engine, request):
    return [c async for c in engine.generate(request)]


def R(prompt="a b c", max_tokens=4, **kw):
    return GenerationRequest(request_id="r", model="echo", prompt=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, **kw.pop("s", {})), **kw)


def test_echo_is_deterministic_and_reports_usage():
    async def go():
        e = SimEngine("echo", SimConfig(tokens_per_second=10_000))
        await e.start()
        chunks = await collect(e, R())
        assert "".join(c.text for c in chunks) == "a b c a"
        assert chunks[-1].finish_reason is FinishReason.LENGTH
        assert chunks[-1].usage.prompt_tokens == 3 and chunks[-1].usage.completion_tokens == 4
        again = await collect(e, R())
        assert [c.token_ids for c in again] == [c.token_ids for c in chunks]
    run(go())


def test_resume_continues_where_another_replica_stopped():
    async def go():
        e = SimEngine("echo", SimConfig(tokens_per_second=10_000))
        await e.start()
        full = await collect(e, R(max_tokens=6))
        ids = [t for c in full for t in c.token_ids]
        rest = await collect(e, R(max_tokens=6, resume_token_ids=ids[:2]))
        assert [t for c in rest for t in c.token_ids] == ids[2:]
    run(go())


def test_stop_string_is_not_returned():
    async def go():
        e = SimEngine("echo", SimConfig(tokens_per_second=10_000))
        await e.start()
        chunks = await collect(e, R("x y z", max_tokens=10, s={"stop": ("z",)}))
        assert "".join(c.text for c in chunks) == "x y "
        assert chunks[-1].finish_reason is FinishReason.STOP
    run(go())


def test_invalid_requests_are_refused_before_any_chunk():
    async def go():
        e = SimEngine("echo", SimConfig(max_context=8))
        await e.start()
        with pytest.raises(InvalidRequestError, match="context"):
            await collect(e, R("a b c", max_tokens=10))
        with pytest.raises(InvalidArgument, match="empty"):
            R("")  # a request type that cannot be built unchecked
    run(go())


def test_running_set_is_bounded_and_priority_orders_the_queue():
    async def go():
        e = SimEngine("echo", SimConfig(tokens_per_second=200, max_running=1, max_waiting=2))
        await e.start()
        order = []

        async def job(name, prio):
            req = R(max_tokens=2, priority=prio)
            async for c in e.generate(req):
                if c.finish_reason:
                    order.append(name)

        first = asyncio.create_task(job("first", Priority.STANDARD))
        await asyncio.sleep(0.001)
        low = asyncio.create_task(job("low", Priority.SHEDDABLE))
        mid = asyncio.create_task(job("mid", Priority.STANDARD))
        while e.load().queue_depth < 2:
            await asyncio.sleep(0.001)
        assert e.load().running == 1
        with pytest.raises(CapacityError):
            await collect(e, R())
        # CRITICAL work (the control plane's probe) takes a reserved slot at once.
        high = asyncio.create_task(job("high", Priority.CRITICAL))
        while e.load().running < 2 and not high.done():
            await asyncio.sleep(0.001)
        await asyncio.gather(first, low, mid, high)
        assert order.index("mid") < order.index("low")  # the queue is in priority order
        assert order.index("high") < order.index("mid")
        assert e.load().running == 0 and e.load().queue_depth == 0
    run(go())


def test_cancellation_frees_the_slot():
    async def go():
        e = SimEngine("echo", SimConfig(tokens_per_second=50, max_running=1))
        await e.start()
        gen = e.generate(R(max_tokens=100))
        await gen.__anext__()
        assert e.load().running == 1 and e.load().kv_blocks_used >= 1
        await gen.aclose()
        assert e.load().running == 0 and e.load().kv_blocks_used == 0
    run(go())


def test_a_stream_whose_consumer_stopped_pulling_frees_its_compute_slot():
    """Flow control pauses a stream whose client stopped reading; it keeps its KV but not its
    running slot, so other requests are not starved behind it."""
    async def go():
        e = SimEngine("echo", SimConfig(tokens_per_second=200, max_running=1))
        await e.start()
        stalled = e.generate(R("a b c", max_tokens=50))
        await stalled.__anext__()  # one chunk taken, then the consumer stops pulling
        other = await asyncio.wait_for(collect(e, R("x y", max_tokens=3)), 5)
        assert "".join(c.text for c in other) == "x y x"
        assert e.load().running == 0 and e.load().kv_blocks_used > 0  # paused, still holding KV
        await stalled.aclose()
        await e.stop()
    run(go())
