"""Decode throughput probe (not a test): python -m services.modelserver.torch_engine.bench [dtype] [batches].

Drives EngineCore directly with EOS disabled so every sequence produces exactly --tokens tokens.
"""

from __future__ import annotations

import argparse
import time

import torch

from ..engine.base import SamplingParams
from .config import TorchEngineConfig, resolve_dtype
from .engine_core import CoreRequest, EngineCore
from .model import KVCache, LlamaModel
from .tokenizer import Tokenizer
from .weights import load_checkpoint, resolve_source


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--source", default="embedded")
    ap.add_argument("--int8-max-tokens", type=int, default=TorchEngineConfig.int8_max_tokens)
    ap.add_argument("--kv-cache-dtype", default=TorchEngineConfig.kv_cache_dtype, choices=("auto", "int8"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    path = resolve_source(a.source)
    args, tensors = load_checkpoint(path)
    tok = Tokenizer(path)
    dtype = resolve_dtype(a.dtype)
    cfg = TorchEngineConfig(max_running=128, step_token_budget=1024)
    model = LlamaModel(args, tensors, dtype, 4096, int8_max_tokens=a.int8_max_tokens)
    bs = cfg.block_size
    kv_dtype = a.kv_cache_dtype
    kv = KVCache.allocate(args, cfg.num_blocks(KVCache.bytes_per_block(args, bs, dtype, kv_dtype)), bs, dtype, kv_dtype)
    print(f"dtype={dtype} threads={torch.get_num_threads()} kv_blocks={kv.num_blocks} "
          f"int8_max_tokens={a.int8_max_tokens} kv_cache_dtype={kv_dtype}")
    for bsz in (int(x) for x in a.batches.split(",")):
        core = EngineCore(model, kv, tok.decode, frozenset(), cfg.max_running, cfg.step_token_budget, 4096)
        for i in range(bsz):
            ids = tok.encode_chat([("user", f"Write a story about robot number {i}.")])
            core.add_request(CoreRequest(f"r{i}", ids, SamplingParams(max_tokens=a.tokens)))
        core.step()  # prefill all (within budget) outside the timed decode loop
        t0 = time.perf_counter()
        n0 = core.generated_tokens
        while core.has_work():
            core.step()
        dt = time.perf_counter() - t0
        n = core.generated_tokens - n0
        print(f"batch {bsz:3d}: {n / dt:7.1f} tok/s aggregate, {n / dt / bsz:6.1f} tok/s per sequence, "
              f"{dt / max(core.num_steps - 1, 1) * 1000:6.1f} ms/step")


if __name__ == "__main__":
    main()
