"""Backpressure: a consumer that stops reading pauses its own request (blocks kept), the others run
on, and reading again resumes it to completion."""

from __future__ import annotations

import asyncio

import pytest
from engine_helpers import collect, prompt, tokens_of

from services.modelserver.engine.base import FinishReason
from tests.helpers import eventually

pytestmark = pytest.mark.model


def _seq_of(engine, request_id: str):
    core = engine.core
    for rid, a in list(core._active.items()):  # noqa: SLF001 - the test inspects the core's state
        if rid.startswith(request_id + "#"):
            return a.seq
    return None


def test_stalled_consumer_pauses_only_its_request(smol, run):
    cfg = smol.config
    saved = (cfg.pause_chunks, cfg.resume_chunks)
    cfg.pause_chunks, cfg.resume_chunks = 4, 2
    try:
        run(_scenario(smol))
    finally:
        cfg.pause_chunks, cfg.resume_chunks = saved


async def _scenario(smol) -> None:
    slow_req = prompt("1, 2, 3, 4, 5, 6, 7, 8,", max_tokens=120)
    slow = smol.generate(slow_req)
    first = await slow.__anext__()  # then stop reading
    assert await eventually(lambda: (s := _seq_of(smol, slow_req.request_id)) is not None and s.paused, 30)
    seq = _seq_of(smol, slow_req.request_id)
    produced = seq.num_output_tokens
    assert produced < 120 and seq.block_ids  # paused early, blocks kept
    # another request runs to completion while the slow one stays paused
    other = await asyncio.wait_for(collect(smol, prompt("The quick brown fox", max_tokens=24)), 120)
    assert other[-1].finish_reason is not None and len(tokens_of(other)) >= 1
    assert seq.paused and seq.num_output_tokens == produced
    # reading again resumes it; every token arrives, in order
    rest = [c async for c in slow]
    assert rest[-1].finish_reason in (FinishReason.LENGTH, FinishReason.STOP)
    assert len(first.token_ids) + len(tokens_of(rest)) == rest[-1].usage.completion_tokens
    assert await eventually(lambda: smol.load().running == 0, 30)
