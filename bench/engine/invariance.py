"""Batch-invariant mode, measured: greedy outputs of N prompts under three batch compositions and with
and without a warm prefix cache, compared token for token, plus the mode's throughput cost.

    .venv/bin/python bench/engine/invariance.py [--prompts 50] [--tokens 32] [--out file.json]

Prompts share a 160-token prefix (so the cache has something to serve) followed by 16-160 random
tokens. The reference is every prompt alone on a fresh cache; the other runs must equal it exactly.
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

from services.modelserver.engine.base import SamplingParams  # noqa: E402
from services.modelserver.torch_engine.config import resolve_dtype  # noqa: E402
from services.modelserver.torch_engine.engine_core import CoreRequest, EngineCore  # noqa: E402
from services.modelserver.torch_engine.kv_cache import KVCache  # noqa: E402
from services.modelserver.torch_engine.model import LlamaModel  # noqa: E402
from services.modelserver.torch_engine.weights import load_checkpoint  # noqa: E402


def prompts(n: int) -> list[list[int]]:
    rng = random.Random(11)
    prefix = [rng.randint(1000, 40000) for _ in range(160)]
    return [prefix + [rng.randint(1000, 40000) for _ in range(rng.randint(16, 160))] for _ in range(n)]


def run(model: LlamaModel, ps: list[list[int]], tokens: int, *, together: bool, budget: int = 512,
        max_running: int = 64, cache: bool = False) -> tuple[list[list[int]], float]:
    """Greedy outputs per prompt and output tok/s of the run."""
    kv = KVCache.allocate(model.args, num_blocks=len(ps) * 6 + 16, block_size=64, dtype=model.dtype)
    core = EngineCore(model, kv, lambda ids: "", frozenset(), max_running=max_running, token_budget=budget,
                      max_context=4096)
    core.blocks.enable_prefix_caching = cache
    if cache:  # warm: every prompt's first half is computed once before the measured run
        for i, p in enumerate(ps):
            core.add_request(CoreRequest(f"w{i}", p[: len(p) // 2 + 1], SamplingParams(max_tokens=1)))
        _drain(core)
    out: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for i, p in enumerate(ps):
        core.add_request(CoreRequest(f"p{i}", p, SamplingParams(max_tokens=tokens)))
        if not together:
            out.update(_drain(core))
    out.update(_drain(core))
    dt = time.perf_counter() - t0
    return [out[f"p{i}"] for i in range(len(ps))], len(ps) * tokens / dt


def _drain(core: EngineCore) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    while core.has_work():
        for rid, chunk in core.step():
            out.setdefault(rid, []).extend(chunk.token_ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    args, tensors = load_checkpoint("embedded")
    dtype = resolve_dtype("auto")
    inv = LlamaModel(args, tensors, dtype, 4096, invariant_rows=16)
    normal = LlamaModel(args, tensors, dtype, 4096)
    ps = prompts(a.prompts)
    ref, _ = run(inv, ps, a.tokens, together=False)
    checks = {
        "all_at_once": run(inv, ps, a.tokens, together=True),
        "odd_chunks_7_running": run(inv, ps, a.tokens, together=True, budget=97, max_running=7),
        "warm_prefix_cache": run(inv, ps, a.tokens, together=True, cache=True),
    }
    _, normal_tok_s = run(normal, ps, a.tokens, together=True)
    normal_outs = [run(normal, ps, a.tokens, together=t, budget=b)[0] for t, b in ((False, 512), (True, 97))]
    out = {
        "prompts": a.prompts, "tokens": a.tokens, "dtype": str(dtype),
        "identical": {name: sum(x == y for x, y in zip(outs, ref, strict=True)) for name, (outs, _) in checks.items()},
        "invariant_tok_s": round(checks["all_at_once"][1], 1), "normal_tok_s": round(normal_tok_s, 1),
        "normal_mode_identical_alone_vs_chunked": sum(
            x == y for x, y in zip(normal_outs[0], normal_outs[1], strict=True)),
    }
    out["cost"] = round(1 - out["invariant_tok_s"] / out["normal_tok_s"], 3) if out["normal_tok_s"] else None
    print(json.dumps(out))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
