"""Load a Hugging Face folder (config.json + *.safetensors) for Llama, Mistral and Qwen2 models."""

from __future__ import annotations

import glob
import json
import os

import torch

from .weights import Checkpoint, CheckpointError, ModelArgs

_MODEL_TYPES = ("llama", "mistral", "qwen2")

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "mlp_norm",
    "self_attn.q_proj.weight": "q", "self_attn.k_proj.weight": "k", "self_attn.v_proj.weight": "v",
    "self_attn.o_proj.weight": "o", "self_attn.q_proj.bias": "q_bias", "self_attn.k_proj.bias": "k_bias",
    "self_attn.v_proj.bias": "v_bias", "mlp.gate_proj.weight": "gate", "mlp.up_proj.weight": "up",
    "mlp.down_proj.weight": "down",
}
_GLOBAL_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}


def _rope_theta(cfg: dict) -> float:
    """transformers 5 nests RoPE settings under rope_parameters; 4.x used rope_theta/rope_scaling."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise CheckpointError(f"RoPE scaling {kind!r} is not supported")
    return float(params.get("rope_theta") or cfg.get("rope_theta") or 10000.0)


def read_args(folder: str) -> ModelArgs:
    """ModelArgs from config.json, rejecting architectures and features we do not implement."""
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except FileNotFoundError as e:
        raise CheckpointError(f"{folder} has no config.json") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e
    model_type = cfg.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise CheckpointError(f"model_type {model_type!r} is not supported (supported: {_MODEL_TYPES})")
    try:
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        return ModelArgs(
            arch=model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=_rope_theta(cfg),
            max_position=int(cfg.get("max_position_embeddings", 2048)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
        )
    except KeyError as e:
        raise CheckpointError(f"{path} lacks required key {e.args[0]!r}") from e


def load_hf_folder(folder: str) -> Checkpoint:
    """Read every *.safetensors shard and rename tensors; unknown tensors (rotary caches) are ignored."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    args = read_args(folder)
    files = sorted(glob.glob(os.path.join(folder, "*.safetensors")))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            shard = load_file(file)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e
        for key, value in shard.items():
            name = _GLOBAL_NAMES.get(key)
            if name is None and key.startswith("model.layers."):
                idx, rest = key[len("model.layers."):].split(".", 1)
                if rest in _LAYER_NAMES:
                    name = f"layers.{int(idx)}.{_LAYER_NAMES[rest]}"
            if name is not None:
                tensors[name] = value.float()
    if args.tie_embeddings:
        tensors.pop("lm_head", None)
    elif "lm_head" not in tensors:
        raise CheckpointError(f"{folder}: tie_word_embeddings is false but lm_head.weight is missing")
    return args, tensors
