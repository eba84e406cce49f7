"""Batched token sampling: greedy, temperature, top-k and top-p for every row of a step in one pass.

Random rows draw with the exponential-race trick (argmax of p / Exp(1) noise is a sample from p).
The noise for a seeded request comes from its own torch.Generator and always has vocabulary shape,
so the same seed and prompt yield the same tokens whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SamplingRow:
    temperature: float
    top_k: int = 0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    logprobs: bool = False


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[float | None]  # log p(token) under the model's raw distribution, when asked


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator()
    g.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return g


@torch.inference_mode()
def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> SampleResult:
    """Pick one token per row of float32 logits [N, vocab]."""
    n, vocab = logits.shape
    tokens = logits.argmax(dim=-1)
    random_rows = [i for i, r in enumerate(rows) if r.temperature > 0]
    if random_rows:
        idx = torch.tensor(random_rows, dtype=torch.long)
        sub = [rows[i] for i in random_rows]
        temps = torch.tensor([r.temperature for r in sub], dtype=torch.float32).unsqueeze(1)
        scaled = logits[idx] / temps
        noise = _noise(sub, vocab)
        if any(r.top_k > 0 or r.top_p < 1.0 for r in sub):
            tokens[idx] = _sample_truncated(scaled, sub, noise)
        else:
            tokens[idx] = (scaled.softmax(dim=-1) / noise).argmax(dim=-1)
    token_list = tokens.tolist()
    logprobs: list[float | None] = [None] * n
    want = [i for i, r in enumerate(rows) if r.logprobs]
    if want:
        idx = torch.tensor(want, dtype=torch.long)
        lp = torch.log_softmax(logits[idx], dim=-1).gather(1, tokens[idx].unsqueeze(1)).squeeze(1)
        for i, v in zip(want, lp.tolist(), strict=True):
            logprobs[i] = v
    return SampleResult(token_list, logprobs)


def _noise(rows: list[SamplingRow], vocab: int) -> torch.Tensor:
    """Exp(1) noise [rows, vocab]; seeded rows draw from their own generator, in vocabulary order."""
    noise = torch.empty((len(rows), vocab), dtype=torch.float32)
    unseeded = [i for i, r in enumerate(rows) if r.generator is None]
    if len(unseeded) == len(rows):
        return noise.exponential_()
    for i, r in enumerate(rows):
        if r.generator is not None:
            noise[i].exponential_(generator=r.generator)
    if unseeded:
        idx = torch.tensor(unseeded, dtype=torch.long)
        noise[idx] = torch.empty((len(unseeded), vocab), dtype=torch.float32).exponential_()
    return noise


def _sample_truncated(scaled: torch.Tensor, rows: list[SamplingRow], noise: torch.Tensor) -> torch.Tensor:
    """Top-k then top-p over descending-sorted logits; at least the best token always survives."""
    vocab = scaled.shape[1]
    ks = torch.tensor([r.top_k if 0 < r.top_k < vocab else vocab for r in rows]).unsqueeze(1)
    ps = torch.tensor([r.top_p for r in rows], dtype=torch.float32).unsqueeze(1)
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab).unsqueeze(0)
    sorted_logits = sorted_logits.masked_fill(ranks >= ks, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    probs = probs.masked_fill(mass_before >= ps, 0.0)
    choice = (probs / noise.gather(1, order)).argmax(dim=-1, keepdim=True)
    return order.gather(1, choice).squeeze(1)
