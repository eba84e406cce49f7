"""Batch-invariant mode: greedy tokens do not depend on what else is in the batch, on how prefill is
chunked, or on whether the prompt's prefix came from the cache."""

from __future__ import annotations

import pytest

from services.modelserver.engine.base import SamplingParams
from services.modelserver.torch_engine import ops
from services.modelserver.torch_engine.config import resolve_dtype
from services.modelserver.torch_engine.engine_core import CoreRequest, EngineCore
from services.modelserver.torch_engine.kv_cache import KVCache
from services.modelserver.torch_engine.model import LlamaModel
from services.modelserver.torch_engine.weights import load_checkpoint

pytestmark = [pytest.mark.model,
              pytest.mark.skipif(ops.load() is None, reason=f"needs the C++ ops: {ops.status()}")]

SYSTEM = ("You are a careful assistant. Answer in one or two plain sentences, without lists, and say "
          "so when you do not know. Prefer simple words, avoid jargon, and never invent facts, names or "
          "numbers that the question does not give you. If a question is ambiguous, pick the most likely "
          "reading and say which one you picked. Keep units metric and dates in ISO format, and keep a "
          "friendly, calm and professional tone in every answer you give.")
QUESTIONS = ["What is the capital of France?", "Name a color.", "Count to five."]


def _run(model, tok, *, together: bool, budget: int, cache: bool, max_running: int = 8) -> list[list[int]]:
    kv = KVCache.allocate(model.args, num_blocks=48, block_size=64, dtype=model.dtype)
    core = EngineCore(model, kv, tok.decode, frozenset(), max_running=max_running, token_budget=budget,
                      max_context=2048)
    core.blocks.enable_prefix_caching = cache
    if cache:  # warm the cache with the shared system prompt
        core.add_request(CoreRequest("warm", tok.encode_chat([("system", SYSTEM), ("user", "Hi")]),
                                     SamplingParams(max_tokens=1)))
        _drain(core)
    out: dict[str, list[int]] = {}
    for i, q in enumerate(QUESTIONS):
        core.add_request(CoreRequest(f"q{i}", tok.encode_chat([("system", SYSTEM), ("user", q)]),
                                     SamplingParams(max_tokens=6)))
        if not together:
            out.update(_drain(core))
    out.update(_drain(core))
    if cache:
        assert core.blocks.hit_tokens > 0
    return [out[f"q{i}"] for i in range(len(QUESTIONS))]


def _drain(core: EngineCore) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while core.has_work():
        for rid, chunk in core.step():
            out.setdefault(rid, []).extend(chunk.token_ids)
    return out


def test_greedy_tokens_independent_of_batch_chunking_and_cache(smol):
    args, tensors = load_checkpoint("embedded")
    # the dtype the engine runs by default on this CPU (bf16 with native bf16 math, else float32)
    model = LlamaModel(args, tensors, resolve_dtype("auto"), 2048, invariant_rows=16)
    tok = smol.tokenizer
    alone = _run(model, tok, together=False, budget=512, cache=False)
    assert _run(model, tok, together=True, budget=512, cache=False) == alone
    assert _run(model, tok, together=True, budget=37, cache=False, max_running=3) == alone  # odd chunks
    assert _run(model, tok, together=True, budget=512, cache=True) == alone
