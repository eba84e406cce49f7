"""The C++ sampling kernel against a full-sort oracle: same kept set (top-k, top-p, ties by token
id), and each uniform number lands on the token whose kept mass, in vocabulary order, covers it."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from services.modelserver.torch_engine import ops
from services.modelserver.torch_engine.sampler import SamplingRow, make_generator, sample

OPS: Any = ops.load()
pytestmark = pytest.mark.skipif(OPS is None, reason=f"C++ ops not built: {ops.status()}")


def kept_oracle(x: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Weights of the kept tokens (0 elsewhere), found by sorting the whole row in float64."""
    w = ((x.double() - x.max()) / temperature).exp()
    order = sorted(range(len(w)), key=lambda i: (-w[i].item(), i))
    keep = torch.zeros_like(w)
    mass, total = 0.0, w.sum().item()
    for rank, i in enumerate(order):
        if (top_k and rank >= top_k) or mass >= top_p * total:
            break
        keep[i] = w[i]
        mass += w[i].item()
    return keep


def run(x: torch.Tensor, temperature: float, top_k: int, top_p: float, us: list[float]) -> list[int]:
    n = len(us)
    rows = torch.zeros(n, dtype=torch.long)
    return OPS.sample_rows(x.unsqueeze(0), rows, torch.full((n,), temperature), torch.full((n,), top_k),
                           torch.full((n,), top_p, dtype=torch.float32),
                           torch.tensor(us, dtype=torch.float64)).tolist()


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 0.9), (0.8, 0, 0.95), (2.0, 0, 0.5), (1.0, 40, 1.0), (0.7, 100, 0.9), (1.0, 0, 1.0), (5.0, 3, 0.99),
])
def test_matches_sorted_oracle(temperature: float, top_k: int, top_p: float) -> None:
    g = torch.Generator().manual_seed(int(temperature * 100) + top_k)
    x = torch.randn(3000, generator=g) * 2.5
    keep = kept_oracle(x, temperature, top_k, top_p)
    cdf = keep.cumsum(0) / keep.sum()
    us = [(j + 0.5) / 997 for j in range(997)]
    got = run(x, temperature, top_k, top_p, us)
    for u, t in zip(us, got, strict=True):
        assert keep[t] > 0, f"token {t} is outside the kept set"
        before = cdf[t - 1].item() if t else 0.0
        assert before - 1e-6 <= u <= cdf[t].item() + 1e-6
    assert len(set(got)) > 1


def test_flat_row_keeps_lowest_ids_on_ties() -> None:
    vocab = 49152
    got = run(torch.zeros(vocab), 1.0, 0, 0.9, [(j + 0.5) / 500 for j in range(500)])
    assert max(got) < int(0.9 * vocab) + 1 and max(got) > int(0.8 * vocab)
    assert len(set(got)) == 500


def test_banned_tokens_are_never_drawn() -> None:
    x = torch.randn(1000)
    x[::2] = float("-inf")
    got = run(x, 1.0, 0, 1.0, [j / 300 for j in range(300)])
    assert all(t % 2 == 1 for t in got)


def test_nan_row_falls_back_instead_of_failing() -> None:
    x = torch.full((100,), float("nan"))
    assert run(x, 1.0, 0, 0.9, [0.5]) == [0]


def test_bad_row_index_is_refused() -> None:
    one = torch.ones(1)
    with pytest.raises(RuntimeError, match="row index out of range"):
        OPS.sample_rows(torch.zeros(2, 10), torch.tensor([5]), one, torch.zeros(1, dtype=torch.long), one,
                        torch.zeros(1, dtype=torch.float64))


def test_sample_uses_the_kernel_with_the_same_draws_per_seed() -> None:
    """Through sample(): seeded rows give the same tokens alone or batched, kernel or not."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 500, generator=g) * 3
    alone = [sample(x[1:2], [SamplingRow(0.9, top_p=0.9, generator=make_generator(7))], OPS).token_ids[0]
             for _ in range(3)]
    batched = sample(x, [SamplingRow(1.0), SamplingRow(0.9, top_p=0.9, generator=make_generator(7)),
                         SamplingRow(0.0), SamplingRow(0.5, top_k=5)], OPS).token_ids[1]
    assert alone == [batched] * 3
    assert sample(x, [SamplingRow(0.0)] * 4, OPS).token_ids == x.argmax(-1).tolist()
