"""Load a llama.cpp GGUF checkpoint: dequantize every tensor to float32 and undo llama.cpp's Q/K
row permutation so the weights match the Hugging Face (rotate-half) RoPE layout that model.py uses."""

from __future__ import annotations

import numpy as np
import torch

from .weights import Checkpoint, CheckpointError, ModelArgs

# GGUF architectures we run, and whether llama.cpp's converter permuted Q/K rows for them.
_ARCHS = {"llama": True, "mistral": True, "qwen2": False}

_LAYER_NAMES = {
    "attn_norm.weight": "attn_norm", "ffn_norm.weight": "mlp_norm",
    "attn_q.weight": "q", "attn_k.weight": "k", "attn_v.weight": "v", "attn_output.weight": "o",
    "attn_q.bias": "q_bias", "attn_k.bias": "k_bias", "attn_v.bias": "v_bias",
    "ffn_gate.weight": "gate", "ffn_up.weight": "up", "ffn_down.weight": "down",
}
_GLOBAL_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp convert_hf_to_gguf `permute`, which interleaves each head's two rotary
    halves (rows [a0..a31, b0..b31] -> [a0, b0, a1, b1, ...]) for its pairwise RoPE kernel."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        if default is None:
            raise CheckpointError(f"GGUF metadata lacks {key!r}")
        return default
    return f.contents()


def load_gguf(path: str) -> Checkpoint:
    """Parse metadata into ModelArgs and return dequantized float32 tensors under our names."""
    try:
        import gguf
        from gguf.quants import dequantize
    except ImportError as e:  # pragma: no cover - dependency of the torch backend
        raise CheckpointError("reading GGUF needs the 'gguf' package") from e
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # the reader raises bare ValueError/struct errors on garbage
        raise CheckpointError(f"{path} is not a readable GGUF file: {e}") from e
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHS:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported (supported: {sorted(_ARCHS)})")
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "") or "rope_freqs.weight" in {t.name for t in reader.tensors}:
        raise CheckpointError(f"GGUF RoPE scaling ({scaling}) is not supported")

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _GLOBAL_NAMES.get(t.name)
        if name is None and t.name.startswith("blk."):
            _, idx, rest = t.name.split(".", 2)
            if rest in _LAYER_NAMES:
                name = f"layers.{int(idx)}.{_LAYER_NAMES[rest]}"
        if name is None:
            continue
        data = dequantize(t.data, t.tensor_type)
        if not data.flags.writeable:  # unquantized tensors come back as read-only views of the mmap
            data = data.copy()
        tensors[name] = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))

    hidden = int(_field(reader, f"{arch}.embedding_length"))
    n_heads = int(_field(reader, f"{arch}.attention.head_count"))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_heads))
    if "embed" not in tensors:
        raise CheckpointError(f"{path} has no token_embd.weight tensor")
    args = ModelArgs(
        arch=arch,
        vocab_size=int(tensors["embed"].shape[0]),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_layers=int(_field(reader, f"{arch}.block_count")),
        num_heads=n_heads,
        num_kv_heads=n_kv,
        head_dim=int(_field(reader, f"{arch}.attention.key_length", hidden // n_heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_embeddings="lm_head" not in tensors,
        attention_bias="layers.0.q_bias" in tensors,
    )
    if _ARCHS[arch]:
        for i in range(args.num_layers):
            for key, heads in (("q", n_heads), ("k", n_kv)):
                name = f"layers.{i}.{key}"
                if name in tensors:
                    tensors[name] = unpermute_qk(tensors[name], heads)
    return args, tensors
