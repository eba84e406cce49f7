"""Forward-only micro figures beside the end-to-end run: one decode step's forward at a given batch and
context, with the C++ kernels and with the plain-torch path, and with the int8 KV cache (same pages),
the sampler's cost, and the step's bytes (weights + K/V read) against the machine's measured memory
bandwidth.

    .venv/bin/python bench/engine/micro.py [--batches 1,16,64] [--context 600] [--repeats 5]

Variants run side by side in one process, so their ratio holds even on a noisy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from services.modelserver.torch_engine import ops  # noqa: E402
from services.modelserver.torch_engine.config import resolve_dtype  # noqa: E402
from services.modelserver.torch_engine.forward_batch import SeqSlice, build_forward_batch  # noqa: E402
from services.modelserver.torch_engine.kv_cache import KVCache  # noqa: E402
from services.modelserver.torch_engine.model import LlamaModel  # noqa: E402
from services.modelserver.torch_engine.sampler import SamplingRow, sample  # noqa: E402
from services.modelserver.torch_engine.weights import load_checkpoint  # noqa: E402


def bandwidth_gb_s(mb: int = 512, repeats: int = 5) -> float:
    """Best read+write rate of a large tensor copy (counts both directions)."""
    src = torch.empty(mb * (1 << 20) // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def _time(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def decode_step(model: LlamaModel, kv: KVCache, batch: int, context: int, rng: random.Random):
    """A step of `batch` decodes whose contexts spread around `context` over random pages."""
    bs = kv.block_size
    pages = list(range(kv.num_blocks))
    rng.shuffle(pages)
    slices = []
    for _ in range(batch):
        ctx = max(1, int(context * rng.uniform(0.5, 1.5)))
        table = [pages.pop() for _ in range(-(-ctx // bs))]
        slices.append(SeqSlice([rng.randint(1000, 40000)], ctx - 1, table, True))
    return build_forward_batch(slices, bs)


def prefill_figures(model: LlamaModel, kv: KVCache, tokens: int, chunk: int, repeats: int) -> dict:
    """A `tokens`-long prompt prefilled cold (in `chunk`-token steps, as the engine does) against the
    same prompt with its first half already cached (only the second half computed)."""
    rng = random.Random(1)
    ids = [rng.randint(1000, 40000) for _ in range(tokens)]
    bs = kv.block_size
    table = list(range(-(-tokens // bs)))

    def run(start: int) -> None:
        for s in range(start, tokens, chunk):
            part = ids[s:s + chunk]
            model.forward(build_forward_batch([SeqSlice(part, s, table, s + len(part) == tokens)], bs), kv)

    cold = _time(lambda: run(0), repeats)
    warm = _time(lambda: run(tokens // 2), repeats)
    return {"tokens": tokens, "cold_ms": round(cold * 1e3, 1), "half_cached_ms": round(warm * 1e3, 1),
            "speedup": round(cold / warm, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="auto", help="auto: what the engine picks on this CPU")
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    args, tensors = load_checkpoint("embedded")
    dtype = resolve_dtype(a.dtype)
    model = LlamaModel(args, tensors, dtype, 4096)
    torch_model = LlamaModel(args, tensors, dtype, 4096, use_cpu_ops=False)
    # the opt-in int8 weights (steps of up to 4 tokens; they need the C++ kernels)
    int8_model = LlamaModel(args, tensors, dtype, 4096, int8_max_tokens=4) if model.ops is not None else None
    batches = [int(x) for x in a.batches.split(",")]
    blocks = sum(-(-int(a.context * 1.5) // 64) for _ in range(max(batches))) + a.prefill_tokens // 64 + 8
    kv = KVCache.allocate(args, blocks, 64, dtype)
    kv.k.normal_()
    kv.v.normal_()
    kv8 = KVCache.allocate(args, blocks, 64, dtype, "int8")  # same pages, int8 with per-token scales
    for pool in (kv8.k, kv8.v):
        pool.random_(-127, 128)
    for pool in kv8.pools[2:]:
        pool.uniform_(0.005, 0.02)
    elem = torch.empty((), dtype=dtype).element_size()
    weight_bytes = sum(t.numel() for t in tensors.values()) * elem
    bw = bandwidth_gb_s()
    out: dict = {"bandwidth_gb_s": round(bw, 1), "weight_bytes": weight_bytes, "cpu_ops": ops.status(),
                 "dtype": str(dtype),
                 "context": a.context, "threads": a.threads, "decode": {}}
    rng = random.Random(0)
    for bsz in batches:
        b = decode_step(model, kv, bsz, a.context, rng)
        kv_bytes = sum(b.context_lens) * 2 * args.num_layers * args.num_kv_heads * args.head_dim * elem
        step_bytes = weight_bytes + kv_bytes
        kv8_bytes = sum(b.context_lens) * 2 * args.num_layers * args.num_kv_heads * (args.head_dim + 4)
        row: dict = {"step_bytes": step_bytes, "roofline_ms": round(step_bytes / (bw * 1e9) * 1e3, 2),
                     "kv8_step_bytes": weight_bytes + kv8_bytes}
        variants = [("cpu_ops", model, kv), ("torch", torch_model, kv), ("cpu_ops_kv8", model, kv8)]
        if int8_model is not None and bsz <= 4:
            variants.append(("cpu_ops_int8", int8_model, kv8))
        for name, m, cache in variants:
            if name.startswith("cpu_ops") and m.ops is None:
                continue
            row[f"{name}_ms"] = round(_time(lambda m=m, b=b, c=cache: m.forward(b, c), a.repeats) * 1e3, 2)
            if name in ("cpu_ops", "torch"):
                row[f"{name}_roofline_fraction"] = round(row["roofline_ms"] / row[f"{name}_ms"], 3)
        logits = model.forward(b, kv)
        greedy = [SamplingRow(0.0)] * bsz
        sampled = [SamplingRow(0.8, top_p=0.95)] * bsz
        for key, rows in (("sample_greedy_ms", greedy), ("sample_top_p_ms", sampled)):
            row[key] = round(_time(lambda lg=logits, r=rows: sample(lg, r, model.ops), a.repeats) * 1e3, 2)
        out["decode"][str(bsz)] = row
        print(f"batch {bsz:3d}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    out["prefill"] = prefill_figures(model, kv, a.prefill_tokens, 512, max(1, a.repeats // 2))
    print(f"prefill: {out['prefill']}")
    print(f"memory bandwidth {bw:.1f} GB/s; C++ ops: {ops.status()}")
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
