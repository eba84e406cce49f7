"""Sampler without a full sort: candidates escalate until they hold the top-p set, and the sampled
frequencies follow the truncated, renormalised distribution."""

from __future__ import annotations

from typing import Any

import torch

from services.modelserver.torch_engine.sampler import CANDIDATES, SamplingRow, make_generator, sample


def test_flat_distribution_escalates_past_every_candidate_count(kernels: Any):
    vocab = CANDIDATES[-1] * 4
    x = torch.zeros((2, vocab))
    x[1, :10] = 1.0  # a second, peaked row in the same batch
    seen: set[int] = set()
    for _ in range(300):
        out = sample(x, [SamplingRow(1.0, top_p=0.9), SamplingRow(1.0, top_k=3)], kernels)
        seen.add(out.token_ids[0])
        assert out.token_ids[1] < 10
    # 90% of a flat vocabulary: far more distinct tokens than any candidate count could give
    assert len(seen) > 250
    assert max(seen) > CANDIDATES[-1]


def test_frequencies_follow_truncated_distribution(kernels: Any):
    probs = torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    x = probs.log().unsqueeze(0).repeat(4000, 1)
    g = make_generator(5)
    out = sample(x, [SamplingRow(1.0, top_p=0.79, top_k=5, generator=g)] * 4000, kernels).token_ids
    counts = torch.bincount(torch.tensor(out), minlength=6).float() / 4000
    # mass before the 4th token is 0.8 >= top_p: 3 tokens kept (top_p 0.8 would sit on a rounding edge)
    kept = probs[:3] / probs[:3].sum()
    assert counts[3:].sum() == 0
    assert torch.allclose(counts[:3], kept, atol=0.03)


def test_temperature_only_rows_use_the_whole_vocabulary(kernels: Any):
    x = torch.zeros((1, 5000))
    got = {sample(x, [SamplingRow(1.0)], kernels).token_ids[0] for _ in range(200)}
    assert len(got) > 150
