"""Export the embedded SmolLM2 GGUF to a Hugging Face folder (safetensors, config.json, tokenizer)
for the peers that cannot read it (transformers' fast path, vLLM). Reuses the torch engine's GGUF
loader, so every system computes with the same dequantized weights (stored as bfloat16)."""

from __future__ import annotations

import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

from services.modelserver.torch_engine.tokenizer import Tokenizer  # noqa: E402
from services.modelserver.torch_engine.weights import load_checkpoint, resolve_source  # noqa: E402

_LAYER = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight",
          "q": "self_attn.q_proj.weight", "k": "self_attn.k_proj.weight", "v": "self_attn.v_proj.weight",
          "o": "self_attn.o_proj.weight", "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight",
          "down": "mlp.down_proj.weight"}


def export(folder: str, source: str = "embedded") -> str:
    """Write the folder unless it is already complete; returns it."""
    if os.path.isfile(os.path.join(folder, ".complete")):
        return folder
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    args, t = load_checkpoint(source)
    out = {"model.embed_tokens.weight": t["embed"], "model.norm.weight": t["final_norm"]}
    if not args.tie_embeddings:
        out["lm_head.weight"] = t["lm_head"]
    for i in range(args.num_layers):
        for ours, theirs in _LAYER.items():
            out[f"model.layers.{i}.{theirs}"] = t[f"layers.{i}.{ours}"]
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in out.items()},
              os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    tok = Tokenizer(resolve_source(source))
    tok.save(folder)
    eos = sorted(tok.eos_token_ids)
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": args.vocab_size,
        "hidden_size": args.hidden_size, "intermediate_size": args.intermediate_size,
        "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads, "head_dim": args.head_dim, "rms_norm_eps": args.rms_norm_eps,
        "rope_theta": args.rope_theta, "max_position_embeddings": args.max_position,
        "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "torch_dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": eos[0] if eos else 2, "attention_bias": False,
        "mlp_bias": False,
    }
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=1)
    with open(os.path.join(folder, "generation_config.json"), "w", encoding="utf-8") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": config["eos_token_id"]}, f)
    open(os.path.join(folder, ".complete"), "w").close()
    return folder


def parameter_count(source: str = "embedded") -> int:
    """Parameters the model multiplies per token (tied embeddings counted once)."""
    _, t = load_checkpoint(source)
    return sum(v.numel() for v in t.values())


if __name__ == "__main__":
    print(export(sys.argv[1] if len(sys.argv) > 1 else os.path.join(HERE, "..", ".cache", "smollm2-hf")))
