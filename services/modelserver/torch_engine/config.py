"""Tunables of the torch engine, resolved once at start so the hot loop never re-reads them."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from services.modelserver.engine.options import check_values

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class TorchEngineConfig:
    #: "float32", "bfloat16" or "auto": bf16 where the CPU computes it natively (AVX-512-BF16 or
    #: AMX), float32 elsewhere. Decided from CPU flags, not timings, so every replica on the same
    #: hardware runs the same arithmetic and gives the same answers.
    dtype: str = "auto"
    #: torch intra-op threads; 0 keeps torch's default.
    threads: int = 0
    #: tokens per KV cache page (the C++ kernel takes 16, 32, 64 or 128; 64 measured fastest).
    block_size: int = 64
    #: KV pool size in blocks; when 0 it is derived from kv_cache_bytes. The pool is never exceeded.
    kv_cache_blocks: int = 0
    kv_cache_bytes: int = 512 * 1024 * 1024
    #: "auto" (the model's dtype) or "int8": K/V stored as int8 with a float32 scale per token and
    #: KV head, ~3.8x fewer bytes than float32 for attention to read and a pool that holds as many
    #: more tokens; changes answers slightly (bench/engine/accuracy.py measures by how much).
    kv_cache_dtype: str = "auto"
    #: sequences that may hold KV blocks and run in one step.
    max_running: int = 64
    #: tokens computed per step (decode tokens + prefill chunks): bounds step latency.
    step_token_budget: int = 512
    #: cap on prompt + generated tokens; 0 = the model's own limit.
    max_context: int = 4096
    #: requests allowed to wait for admission before generate() raises CapacityError.
    max_waiting: int = 1024
    #: steps computing at most this many tokens use weight-only int8 matmuls (the C++ kernel, scales per
    #: 32 columns; 0 = never): a lone decoding sequence is bound by weight bytes read, which int8 cuts
    #: to a quarter of float32's. Off by default because it changes answers (docs/architecture.md).
    int8_max_tokens: int = 0
    #: greedy output independent of batch composition, chunking and prefix-cache state: GEMMs run
    #: in fixed blocks of `invariant_rows` rows, attention in the C++ kernel (required), no int8.
    batch_invariant: bool = False
    invariant_rows: int = 16
    #: backpressure: a request whose consumer has this many chunks unread stops being scheduled
    #: (it keeps its KV blocks) until it drains below `resume_chunks`.
    pause_chunks: int = 64
    resume_chunks: int = 16
    #: run a short generation in start() so the first real request does not pay for lazy init.
    warmup: bool = True
    #: use the shared KV tier when the server has a store (services/cache/kv_tier.py).
    shared_kv: bool = True

    def validate(self) -> None:
        """Fail at construction rather than deep inside the step loop; the ranges and the rules
        across options live in the option schema (services/modelserver/engine/options.py), shared
        with the control plane, which refuses the same values when a deployment is written."""
        check_values("torch", asdict(self))

    def num_blocks(self, bytes_per_block: int) -> int:
        """Pool size in blocks: the explicit count, else as many whole blocks as the byte budget holds."""
        if self.kv_cache_blocks:
            return self.kv_cache_blocks
        n = self.kv_cache_bytes // bytes_per_block
        if n < 1:
            raise ValueError(f"kv_cache_bytes={self.kv_cache_bytes} holds no {bytes_per_block}-byte block")
        return n


def resolve_dtype(name: str) -> torch.dtype:
    """Map the config string to a dtype; "auto" is bf16 where the CPU has native bf16 math.

    bf16 wins by 3-4x on CPUs with AMX/AVX512-BF16 and loses badly on CPUs without.
    """
    if name != "auto":
        return _DTYPES[name]
    cpu = torch.cpu
    if cpu._is_amx_tile_supported():  # noqa: SLF001 - torch exposes these CPU probes only privately
        cpu._init_amx()  # noqa: SLF001 - Linux grants AMX tile state per process; without it: SIGILL
        return torch.bfloat16
    return torch.bfloat16 if cpu._is_avx512_bf16_supported() else torch.float32  # noqa: SLF001
