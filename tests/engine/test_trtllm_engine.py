"""TensorRTLLMEngine driven through the fake TensorRT-LLM (trtllm_fake.py) on CPU: the behaviour
checks every engine passes, plus what is particular to this backend (stop strings TensorRT-LLM does
not see, trimmed stop words, priority, load from stats, KV events, error mapping)."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools

import pytest

from services.modelserver.engine.base import (
    ChatMessage,
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    Priority,
    SamplingParams,
)
from services.modelserver.trtllm import TensorRTLLMEngine
from services.modelserver.trtllm.kv_events import KvEvent
from tests.engine import engine_behaviour as behaviour
from tests.engine.engine_behaviour import collect, ids_of, text_of
from tests.engine.trtllm_fake import FakeLLM, fake_api
from tests.helpers import eventually

_ids = itertools.count()


def make(prompt: str = "Once upon a time", **sampling) -> GenerationRequest:
    return GenerationRequest(f"r{next(_ids)}", "m", prompt=prompt, sampling=SamplingParams(**sampling))


@pytest.fixture
async def engine():
    eng = TensorRTLLMEngine("m", "/models/fake", api=fake_api, max_context=1024, max_running=4,
                            poll_timeout_s=0.05, stats_stale_s=0.5)
    await eng.start()
    yield eng
    await eng.stop()


def fake(engine: TensorRTLLMEngine) -> FakeLLM:
    llm = engine._llm  # noqa: SLF001 - the test inspects the fake it injected
    assert isinstance(llm, FakeLLM)
    return llm


async def test_configured_like_our_engine(engine):
    kw = fake(engine).kwargs
    assert kw["enable_chunked_prefill"] is True and kw["enable_iter_perf_stats"] is True
    assert kw["max_seq_len"] == 1024 and kw["max_batch_size"] == 4 and kw["max_num_tokens"] == 1024
    kv = kw["kv_cache_config"]
    assert kv.enable_block_reuse is True and kv.tokens_per_block == 16 and kv.event_buffer_max_size > 0
    assert str(kw["scheduler_config"].waiting_queue_policy) == "priority"


async def test_streams(engine):
    await behaviour.check_streaming(engine, make)


async def test_stop_string_matched_by_tensorrt_llm_is_held_back_and_trimmed(engine):
    # " END" is " E" + "ND" as tokens: the fake (like TensorRT-LLM) matches it and trims both ids.
    await behaviour.check_stop_string(engine, make, " END")


async def test_stop_string_tensorrt_llm_cannot_see_is_cut_here(engine):
    # "the mat" encodes to other tokens than the model produced: only the text matcher sees it.
    await behaviour.check_stop_string(engine, make, "the mat")
    assert await eventually(lambda: not fake(engine).running, 10)  # aborted in TensorRT-LLM too


async def test_stop_string_never_completed_is_released_at_the_end(engine):
    chunks = await collect(engine, make(max_tokens=11, stop=(" EX",)))  # " E" is held back, then released
    ref = await collect(engine, make(max_tokens=11))
    assert text_of(chunks) == text_of(ref) and ids_of(chunks) == ids_of(ref)
    assert chunks[-1].finish_reason is FinishReason.LENGTH


async def test_resume_after_migration_is_exact(engine):
    await behaviour.check_resume(engine, make)


async def test_cancel_frees_the_request(engine):
    await behaviour.check_cancel_frees(engine, make, busy=lambda: bool(fake(engine).running))


async def test_deadline_cancels(engine):
    await behaviour.check_deadline(engine, make)


async def test_logprobs_one_per_token(engine):
    chunks = await collect(engine, make(max_tokens=6, logprobs=True))
    assert [lp for c in chunks for lp in c.logprobs] == [-0.25] * 6


async def test_stop_token_id_is_not_sent(engine):
    ref = ids_of(await collect(engine, make(max_tokens=8)))
    chunks = await collect(engine, make(max_tokens=8, stop_token_ids=(ref[3],)))
    assert ids_of(chunks) == ref[:3] and chunks[-1].finish_reason is FinishReason.STOP
    behaviour.assert_well_formed(chunks)


async def test_chat_messages_use_the_template(engine):
    req = GenerationRequest("c", "m", messages=[ChatMessage("user", "hi")], sampling=SamplingParams(max_tokens=3))
    usage = (await collect(engine, req))[-1].usage
    templated = fake(engine).tokenizer.encode("<|user|>hi<|assistant|>", add_special_tokens=False)
    assert usage is not None and usage.prompt_tokens == len(templated)


async def test_priority_reaches_the_waiting_queue(engine):
    llm = fake(engine)
    llm.hold = True  # the GPU is busy: everything waits
    order = [Priority.SHEDDABLE, Priority.STANDARD, Priority.CRITICAL]
    tasks = [asyncio.create_task(collect(engine, dataclasses.replace(make(max_tokens=2), priority=p)))
             for p in order]
    assert await eventually(lambda: len(llm.waiting) == 3, 10)
    assert sorted(r.priority for r in llm.waiting) == [0.0, 0.5, 1.0]
    llm.hold = False
    llm.wake()
    await asyncio.gather(*tasks)
    assert llm.admitted[-3:] == [1.0, 0.5, 0.0]  # CRITICAL first, though it arrived last


async def test_load_is_unknown_until_stats_then_follows_them(engine):
    assert engine.load().unknown  # started, nothing ran: no stats yet
    llm = fake(engine)
    llm.hold = True
    tasks = [asyncio.create_task(collect(engine, make(max_tokens=200))) for _ in range(6)]
    await asyncio.sleep(0.02)
    llm.hold = False
    llm.wake()
    load = None
    for _ in range(500):
        load = engine.load()
        if not load.unknown and load.running == 4 and load.kv_blocks_total > 0:
            break
        await asyncio.sleep(0.01)
    assert load is not None and not load.unknown
    assert load.running == 4 and load.queue_depth == 2 and 0 < load.kv_blocks_used <= load.kv_blocks_total
    await asyncio.gather(*tasks)


async def test_kv_events_report_stored_blocks(engine):
    events = engine.kv_events()
    await collect(engine, make(max_tokens=40))
    stored: list[KvEvent] = []
    while len(stored) < 2:
        ev = await asyncio.wait_for(events.__anext__(), 5)
        if ev.kind == "stored":
            stored.append(ev)
    assert all(len(ev.block_hashes) == 1 and len(ev.block_tokens[0]) == 16 for ev in stored)
    assert stored[1].seq > stored[0].seq
    await events.aclose()


async def test_repeated_prompt_reports_cached_tokens(engine):
    prompt = "Once upon a time " * 8
    await collect(engine, make(prompt, max_tokens=2))
    usage = (await collect(engine, make(prompt, max_tokens=2)))[-1].usage
    assert usage is not None and usage.cached_tokens >= 16


async def test_request_error_before_streaming_is_invalid_argument(engine):
    fake(engine).chunked = False
    fake(engine).max_num_tokens = 4
    with pytest.raises(InvalidRequestError, match="rejected the request"):
        await collect(engine, make("Once upon a time, a long prompt", max_tokens=2))


async def test_request_error_from_the_stream_is_invalid_argument(engine):
    with pytest.raises(InvalidRequestError, match="rejected the request"):
        await collect(engine, make("BADREQ", max_tokens=5))


async def test_engine_failure_is_unavailable(engine):
    with pytest.raises(EngineUnavailableError, match="failed"):
        await collect(engine, make("CRASH", max_tokens=50))
    fake(engine).shutdown()
    with pytest.raises(EngineUnavailableError, match="shutting down"):
        await collect(engine, make(max_tokens=2))


async def test_too_long_is_rejected_before_submitting(engine):
    with pytest.raises(InvalidRequestError, match="exceeds the context"):
        await collect(engine, make(max_tokens=1024))
