"""What reduced precision costs in answers: bf16, weight-only int8 and the int8 KV cache against float32
logits, teacher-forced over a fixed chat transcript (every position is scored, not just a generated
path).

    .venv/bin/python bench/engine/accuracy.py [--out file.json]

Reports per variant the mean and max |logit error|, and the share of positions whose top token
differs from float32's, overall and where float32's top two are more than 1.0 apart (a decisive
choice). Slow where the CPU lacks native bf16 (torch then runs bf16 matmuls on a scalar path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from services.modelserver.torch_engine.forward_batch import SeqSlice, build_forward_batch  # noqa: E402
from services.modelserver.torch_engine.kv_cache import KVCache  # noqa: E402
from services.modelserver.torch_engine.model import LlamaModel  # noqa: E402
from services.modelserver.torch_engine.tokenizer import Tokenizer  # noqa: E402
from services.modelserver.torch_engine.weights import load_checkpoint, resolve_source  # noqa: E402

TURNS = [("user", "What is the capital of France, and what is it known for?"),
         ("assistant", "The capital of France is Paris. It is known for the Eiffel Tower, the Louvre, its cafes "
                       "and its long history as a centre of art, fashion and science."),
         ("user", "Write a short poem about the sea.")]


def all_logits(model: LlamaModel, ids: list[int], kv_dtype: str = "auto") -> torch.Tensor:
    """Float32 logits at every position of `ids`: the prompt in 16-token steps, so later positions read
    what earlier steps stored in the cache (as in serving: with an int8 cache, its rounded values)."""
    kv = KVCache.allocate(model.args, -(-len(ids) // 64), 64, model.dtype, kv_dtype)
    pages = list(range(kv.num_blocks))
    out = []
    for s in range(0, len(ids), 16):
        part = ids[s:s + 16]
        b = build_forward_batch([SeqSlice(part, s, pages, True)], 64)
        b.logits_rows = torch.arange(len(part))
        out.append(model.forward(b, kv))
    return torch.cat(out)


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    err = (got - ref).abs()
    top2 = ref.topk(2, dim=-1).values
    decisive = (top2[:, 0] - top2[:, 1]) > 1.0
    flips = got.argmax(-1) != ref.argmax(-1)
    return {"mean_abs_logit_error": round(err.mean().item(), 4), "max_abs_logit_error": round(err.max().item(), 3),
            "top1_changed": round(flips.float().mean().item(), 4),
            "top1_changed_where_decisive": round(flips[decisive].float().mean().item(), 4),
            "positions": len(ref), "decisive_positions": int(decisive.sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    args, tensors = load_checkpoint("embedded")
    ids = Tokenizer(resolve_source("embedded")).encode_chat(TURNS)
    f32 = LlamaModel(args, tensors, torch.float32, 4096)
    ref = all_logits(f32, ids)
    out = {"int8_kv_cache_float32": compare(ref, all_logits(f32, ids, "int8")),
           "bf16": compare(ref, all_logits(LlamaModel(args, tensors, torch.bfloat16, 4096), ids))}
    if f32.ops is not None:  # int8 weights run in the C++ kernel only
        for name, dtype in (("int8_weights_float32", torch.float32), ("int8_weights_bf16", torch.bfloat16)):
            int8 = LlamaModel(args, tensors, dtype, 4096, int8_max_tokens=1 << 20)
            out[name] = compare(ref, all_logits(int8, ids))
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
