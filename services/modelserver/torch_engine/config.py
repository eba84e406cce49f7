"""Tunables of the torch engine, resolved once at start so the hot loop never re-reads them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TorchEngineConfig:
    #: "float32", "bfloat16" or "auto" (measure a batched matmul at start and keep the faster one).
    dtype: str = "auto"
    #: torch intra-op threads; 0 keeps torch's default.
    threads: int = 0
    #: tokens per KV cache page (the C++ kernel takes 16, 32, 64 or 128; 64 measured fastest).
    block_size: int = 64
    #: KV pool size in blocks; when 0 it is derived from kv_cache_bytes. The pool is never exceeded.
    kv_cache_blocks: int = 0
    kv_cache_bytes: int = 512 * 1024 * 1024
    #: sequences that may hold KV blocks and run in one step.
    max_running: int = 64
    #: tokens computed per step (decode tokens + prefill chunks): bounds step latency.
    step_token_budget: int = 512
    #: cap on prompt + generated tokens; 0 = the model's own limit.
    max_context: int = 4096
    #: requests allowed to wait for admission before generate() raises CapacityError.
    max_waiting: int = 1024
    #: steps computing at most this many tokens use weight-only int8 matmuls (bf16 only; 0 = never):
    #: a lone decoding sequence is bound by weight bytes read, which int8 halves.
    int8_max_tokens: int = 1
    #: run a short generation in start() so the first real request does not pay for lazy init.
    warmup: bool = True

    def validate(self) -> None:
        """Fail at construction rather than deep inside the step loop."""
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        for name in ("block_size", "max_running", "step_token_budget", "max_waiting"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.int8_max_tokens < 0:
            raise ValueError(f"int8_max_tokens must be >= 0, got {self.int8_max_tokens}")
        if self.threads < 0 or self.kv_cache_blocks < 0 or self.kv_cache_bytes < 0 or self.max_context < 0:
            raise ValueError("threads, kv_cache_blocks, kv_cache_bytes and max_context must be >= 0")
        if self.kv_cache_blocks == 0 and self.kv_cache_bytes == 0:
            raise ValueError("give kv_cache_blocks or kv_cache_bytes")

    def num_blocks(self, bytes_per_block: int) -> int:
        """Pool size in blocks: the explicit count, else as many whole blocks as the byte budget holds."""
        if self.kv_cache_blocks:
            return self.kv_cache_blocks
        n = self.kv_cache_bytes // bytes_per_block
        if n < 1:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes} holds no {bytes_per_block}-byte block")
        return n


def resolve_dtype(name: str) -> torch.dtype:
    """Map the config string to a dtype; "auto" times a decode-sized matmul in both and keeps the faster.

    bf16 wins by 3-4x on CPUs with AMX/AVX512-BF16 and loses badly on CPUs without, so measuring
    beats guessing from flags.
    """
    if name != "auto":
        return _DTYPES[name]
    timings = {}
    for dt in (torch.float32, torch.bfloat16):
        x = torch.randn(32, 576, dtype=dt)
        w = torch.randn(1536, 576, dtype=dt)
        with torch.inference_mode():
            for _ in range(3):
                torch.nn.functional.linear(x, w)
            t0 = time.perf_counter()
            for _ in range(20):
                torch.nn.functional.linear(x, w)
            timings[dt] = time.perf_counter() - t0
    return min(timings, key=timings.__getitem__)
