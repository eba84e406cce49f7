"""The machine's compute ceiling: a measured 2048^3 bfloat16 matmul rate."""

from __future__ import annotations

import time

import torch


def bf16_matmul_flops(threads: int, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of the best of `repeats` n^3 bf16 matmuls (2 n^3 FLOPs each) after a warm-up."""
    torch.set_num_threads(threads)
    a = torch.randn(n, n, dtype=torch.bfloat16)
    b = torch.randn(n, n, dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best
