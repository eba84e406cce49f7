"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM2) that runs a flat mixed batch of prefill
chunks and decode tokens against a paged KV cache.

Why this shape: all matmuls run once over every token of the step (the CPU's GEMM efficiency grows
with rows), Q/K/V and gate/up are fused so each layer issues few kernels, and attention reads K/V
through block tables so sequences share cached prefix pages without copying them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import ops as cpu_ops
from .attention import KERNEL_BLOCK_SIZES, KERNEL_HEAD_DIM_MULTIPLE, TorchAttention, kernel_attention, kernel_fits
from .forward_batch import ForwardBatch
from .kv_cache import KVCache
from .linear import Linear
from .weights import ModelArgs

__all__ = ["KVCache", "LlamaModel"]


@dataclass
class _Layer:
    attn_norm: torch.Tensor
    qkv: Linear  # [(H + 2 KV) * hd, hidden]: one GEMM for q, k and v
    o: Linear
    mlp_norm: torch.Tensor
    gate_up: Linear  # [2 * intermediate, hidden]: one GEMM for gate and up
    down: Linear


class LlamaModel:
    """Weights plus a forward over ForwardBatch; holds no per-request state."""

    def __init__(self, args: ModelArgs, tensors: dict[str, torch.Tensor], dtype: torch.dtype,
                 max_positions: int, int8_max_tokens: int = 0, use_cpu_ops: bool = True,
                 invariant_rows: int = 0) -> None:
        """`int8_max_tokens` > 0: steps of at most that many tokens use int8 weight copies (needs the kernels).
        `use_cpu_ops`: run the C++ kernels when they are built (else, or when False, plain torch).
        `invariant_rows` > 0: batch-invariant mode (GEMMs in fixed row blocks; needs the kernels)."""
        self.args = args
        self.dtype = dtype
        self.ops = cpu_ops.load() if use_cpu_ops else None
        if invariant_rows and (self.ops is None or int8_max_tokens):
            raise ValueError(f"batch-invariant mode needs the C++ kernels (they are {cpu_ops.status()}) "
                             "and no int8 path")
        if int8_max_tokens and self.ops is None:
            raise ValueError(f"int8 weights (int8_max_tokens) need the C++ kernels (they are {cpu_ops.status()})")
        q8 = int8_max_tokens
        fixed = self.fixed_rows = invariant_rows

        def lin(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Linear:
            return Linear(weight, bias, q8, fixed, self.ops)

        def w(name: str) -> torch.Tensor:
            return tensors[name].to(dtype).contiguous()

        self.embed = w("embed")
        self.lm_head = lin(self.embed if args.tie_embeddings else w("lm_head"))
        self.final_norm = w("final_norm")
        self.layers: list[_Layer] = []
        for i in range(args.num_layers):
            p = f"layers.{i}."
            bias = None
            if args.attention_bias:
                bias = torch.cat([tensors[p + "q_bias"], tensors[p + "k_bias"], tensors[p + "v_bias"]]).to(dtype)
            self.layers.append(_Layer(
                attn_norm=w(p + "attn_norm"),
                qkv=lin(torch.cat([tensors[p + "q"], tensors[p + "k"], tensors[p + "v"]]).to(dtype), bias),
                o=lin(w(p + "o")),
                mlp_norm=w(p + "mlp_norm"),
                gate_up=lin(torch.cat([tensors[p + "gate"], tensors[p + "up"]]).to(dtype)),
                down=lin(w(p + "down")),
            ))
        # RoPE tables in the rotate-half layout, computed in float32 like transformers does.
        hd = args.head_dim
        inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        self.cos = torch.cat([freqs.cos(), freqs.cos()], dim=-1).to(dtype)
        # sign folded in so rotate_half(x) * sin == roll(x, hd/2) * signed_sin (one kernel fewer)
        self.signed_sin = torch.cat([-freqs.sin(), freqs.sin()], dim=-1).to(dtype)

    @torch.inference_mode()
    def forward(self, b: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """Run all layers over the step's tokens, write their K/V, return float32 logits of logits_rows."""
        if self.ops is None or not kernel_fits(kv.block_size, self.args.head_dim):
            if self.fixed_rows:
                raise ValueError(f"batch-invariant mode needs a page size in {KERNEL_BLOCK_SIZES} and a head_dim "
                                 f"that is a multiple of {KERNEL_HEAD_DIM_MULTIPLE}")
            return self._forward_torch(b, kv)
        a = self.args
        ops = self.ops
        H, hd = a.num_heads, a.head_dim
        T = b.num_tokens
        eps = a.rms_norm_eps
        x = self.embed[b.input_ids]
        h = torch.empty_like(x)
        q = torch.empty((T, H, hd), dtype=x.dtype)
        act = torch.empty((T, a.intermediate_size), dtype=x.dtype)
        ops.add_rms_norm(x, None, self.layers[0].attn_norm, eps, h)
        for li, layer in enumerate(self.layers):
            k_cache, v_cache, k_scale, v_scale = kv.layer(li)
            ops.rope_and_cache(layer.qkv(h), self.cos, self.signed_sin, b.positions, b.slot_mapping, q, k_cache,
                               v_cache, k_scale, v_scale)
            attn = kernel_attention(ops, q, k_cache, v_cache, b, k_scale, v_scale)
            ops.add_rms_norm(x, layer.o(attn.view(T, H * hd)), layer.mlp_norm, eps, h)
            ops.silu_and_mul(layer.gate_up(h), act)
            down = layer.down(act)
            if li + 1 < len(self.layers):
                ops.add_rms_norm(x, down, self.layers[li + 1].attn_norm, eps, h)
            else:
                x += down
        x = x[b.logits_rows]
        out = torch.empty_like(x)
        ops.add_rms_norm(x, None, self.final_norm, eps, out)
        return self.lm_head(out).float()

    def _forward_torch(self, b: ForwardBatch, kv: KVCache) -> torch.Tensor:
        """The plain-torch path: the fallback, and the oracle the kernels are tested against."""
        a = self.args
        H, KV, hd = a.num_heads, a.num_kv_heads, a.head_dim
        inter = a.intermediate_size
        T = b.num_tokens
        x = self.embed[b.input_ids]
        attend = TorchAttention(b, H, kv.block_size)
        cos = self.cos[b.positions].unsqueeze(1)
        sin = self.signed_sin[b.positions].unsqueeze(1)
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, (a.hidden_size,), layer.attn_norm, a.rms_norm_eps)
            qkv = layer.qkv(h)
            qk = qkv[:, : (H + KV) * hd].view(T, H + KV, hd)
            qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
            v = qkv[:, (H + KV) * hd:].view(T, KV, hd)
            k_cache, v_cache, k_scale, v_scale = kv.layer(li)
            attn = attend(qk[:, :H], qk[:, H:], v, k_cache, v_cache, b.slot_mapping, k_scale, v_scale)
            x = x + layer.o(attn.view(T, H * hd))
            h = F.rms_norm(x, (a.hidden_size,), layer.mlp_norm, a.rms_norm_eps)
            gu = layer.gate_up(h)
            x = x + layer.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        x = F.rms_norm(x[b.logits_rows], (a.hidden_size,), self.final_norm, a.rms_norm_eps)
        return self.lm_head(x).float()
