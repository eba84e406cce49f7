"""The simulated engine: deterministic echo, batching limits, priorities, cancellation."""

import asyncio

import pytest

from services.common.errors import InvalidArgument
from services.modelserver.engine.base import (
    CapacityError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    Priority,
    SamplingParams,
)
from services.modelserver.engine.sim import SimConfig, SimEngine
from tests.helpers import until


async def collect(engine: SimEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(request)]


def R(prompt="a b c", max_tokens=4, **kw) -> GenerationRequest:
    return GenerationRequest(request_id="r", model="echo", prompt=prompt,
                             sampling=SamplingParams(max_tokens=max_tokens, **kw.pop("s", {})), **kw)


async def started(config: SimConfig) -> SimEngine:
    engine = SimEngine("echo", config)
    await engine.start()
    return engine


async def test_echo_is_deterministic_and_reports_usage():
    e = await started(SimConfig(tokens_per_second=10_000))
    chunks = await collect(e, R())
    assert "".join(c.text for c in chunks) == "a b c a"
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens == 3 and usage.completion_tokens == 4
    again = await collect(e, R())
    assert [c.token_ids for c in again] == [c.token_ids for c in chunks]


async def test_resume_continues_where_another_replica_stopped():
    e = await started(SimConfig(tokens_per_second=10_000))
    full = await collect(e, R(max_tokens=6))
    ids = [t for c in full for t in c.token_ids]
    rest = await collect(e, R(max_tokens=6, resume_token_ids=ids[:2]))
    assert [t for c in rest for t in c.token_ids] == ids[2:]


async def test_stop_string_is_not_returned():
    e = await started(SimConfig(tokens_per_second=10_000))
    chunks = await collect(e, R("x y z", max_tokens=10, s={"stop": ("z",)}))
    assert "".join(c.text for c in chunks) == "x y "
    assert chunks[-1].finish_reason is FinishReason.STOP


async def test_invalid_requests_are_refused_before_any_chunk():
    e = await started(SimConfig(max_context=8))
    with pytest.raises(InvalidRequestError, match="context"):
        await collect(e, R("a b c", max_tokens=10))
    with pytest.raises(InvalidArgument, match="empty"):
        R("")  # a request type that cannot be built unchecked


async def test_running_set_is_bounded_and_priority_orders_the_queue():
    e = await started(SimConfig(tokens_per_second=50, max_running=1, max_waiting=2))
    order: list[str] = []

    async def job(name: str, prio: Priority, tokens: int = 2) -> None:
        await collect(e, R(max_tokens=tokens, priority=prio))
        order.append(name)

    first = asyncio.create_task(job("first", Priority.STANDARD, tokens=100))  # ~2 s, read throughout
    await until(lambda: e.load().running == 1, 5, "the first request to run")
    low = asyncio.create_task(job("low", Priority.SHEDDABLE))
    mid = asyncio.create_task(job("mid", Priority.STANDARD))
    await until(lambda: e.load().queue_depth == 2, 5, "two requests to queue")
    assert e.load().running == 1
    with pytest.raises(CapacityError):
        await collect(e, R())
    # CRITICAL work (the control plane's probe) takes a reserved slot at once.
    high = asyncio.create_task(job("high", Priority.CRITICAL))
    await asyncio.gather(first, low, mid, high)
    assert order.index("mid") < order.index("low")  # the queue is in priority order
    assert order.index("high") < order.index("mid")
    assert e.load().running == 0 and e.load().queue_depth == 0


async def test_cancellation_frees_the_slot():
    e = await started(SimConfig(tokens_per_second=50, max_running=1))
    gen = e.generate(R(max_tokens=100))
    await gen.__anext__()
    assert e.load().running == 1 and e.load().kv_blocks_used >= 1
    await gen.aclose()
    assert e.load().running == 0 and e.load().kv_blocks_used == 0


async def test_a_stream_whose_consumer_stopped_pulling_frees_its_compute_slot():
    """Flow control pauses a stream whose client stopped reading; it keeps its KV but not its
    running slot, so other requests are not starved behind it."""
    e = await started(SimConfig(tokens_per_second=200, max_running=1))
    stalled = e.generate(R("a b c", max_tokens=50))
    await stalled.__anext__()  # one chunk taken, then the consumer stops pulling
    other = await asyncio.wait_for(collect(e, R("x y", max_tokens=3)), 5)
    assert "".join(c.text for c in other) == "x y x"
    assert e.load().running == 0 and e.load().kv_blocks_used > 0  # paused, still holding KV
    await stalled.aclose()
    await e.stop()
