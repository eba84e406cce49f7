"""Sampler: greedy, truncation, per-request seeds and logprobs, all in one batched call."""

from __future__ import annotations

import math
from typing import Any

import torch

from services.modelserver.torch_engine.sampler import SamplingRow, make_generator, sample


def logits(rows: int = 3, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * 3


def test_greedy_is_argmax(kernels: Any):
    x = logits()
    out = sample(x, [SamplingRow(0.0)] * 3, kernels)
    assert out.token_ids == x.argmax(-1).tolist()
    assert out.logprobs == [None, None, None]


def test_top_k_1_and_tiny_top_p_are_greedy_even_when_hot(kernels: Any):
    x = logits()
    best = x.argmax(-1).tolist()
    for _ in range(5):
        assert sample(x, [SamplingRow(5.0, top_k=1)] * 3, kernels).token_ids == best
        assert sample(x, [SamplingRow(5.0, top_p=1e-6)] * 3, kernels).token_ids == best


def test_top_k_limits_support(kernels: Any):
    x = logits(rows=1, vocab=20)
    allowed = set(x[0].topk(3).indices.tolist())
    seen = {sample(x, [SamplingRow(10.0, top_k=3)], kernels).token_ids[0] for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_top_p_keeps_smallest_set_reaching_p(kernels: Any):
    x = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    seen = {sample(x, [SamplingRow(1.0, top_p=0.75)], kernels).token_ids[0] for _ in range(300)}
    assert seen == {0, 1}


def test_seed_gives_same_tokens_whatever_the_batch(kernels: Any):
    x = logits(rows=4)
    g_alone, g_batched = make_generator(42), make_generator(42)
    alone, batched = [], []
    for step in range(12):
        alone.append(sample(x[2:3], [SamplingRow(1.0, generator=g_alone)], kernels).token_ids[0])
        others = [SamplingRow(1.0), SamplingRow(0.0), SamplingRow(1.0, generator=g_batched),
                  SamplingRow(0.7, top_p=0.9, generator=make_generator(step))]
        batched.append(sample(x, others, kernels).token_ids[2])
    assert alone == batched
    assert len(set(alone)) > 1  # it really samples


def test_logprobs_are_raw_log_softmax_and_nonpositive(kernels: Any):
    x = logits(rows=2)
    out = sample(x, [SamplingRow(0.0, logprobs=True), SamplingRow(1.3, top_k=5, logprobs=True)], kernels)
    ref = torch.log_softmax(x, -1)
    for i in range(2):
        lp = out.logprobs[i]
        assert lp is not None and lp <= 0.0
        assert math.isclose(lp, ref[i, out.token_ids[i]].item(), rel_tol=1e-5, abs_tol=1e-6)
