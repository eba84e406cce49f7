"""The machine's compute ceiling: a measured n^3 matmul rate in the dtype the engine runs here.

bf16 is measured only where the CPU computes it natively: elsewhere torch falls back to a scalar
path (0.25 GFLOP/s on an AVX2-only CPU), which says nothing about the engine, which runs float32 there.
"""

from __future__ import annotations

import time

import torch


def matmul_flops(threads: int, dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` n^3 matmuls (2 n^3 FLOPs each) after a warm-up."""
    torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    with torch.inference_mode():
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
