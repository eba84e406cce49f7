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

from .forward_batch import ForwardBatch
from .linear import Linear
from .weights import ModelArgs


@dataclass
class KVCache:
    """Pages of keys and values for every layer: [layers, num_blocks, block_size, kv_heads, head_dim]."""

    k: torch.Tensor
    v: torch.Tensor
    block_size: int

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * args.num_layers * block_size * args.num_kv_heads * args.head_dim * elem

    @classmethod
    def allocate(cls, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype) -> KVCache:
        shape = (args.num_layers, num_blocks, block_size, args.num_kv_heads, args.head_dim)
        return cls(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), block_size)


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
                 max_positions: int, int8_max_tokens: int = 0) -> None:
        """`int8_max_tokens` > 0 (bf16): steps of at most that many tokens use int8 weight copies."""
        self.args = args
        self.dtype = dtype
        q8 = int8_max_tokens

        def w(name: str) -> torch.Tensor:
            return tensors[name].to(dtype).contiguous()

        self.embed = w("embed")
        self.lm_head = Linear(self.embed if args.tie_embeddings else w("lm_head"), int8_max_rows=q8)
        self.final_norm = w("final_norm")
        self.layers: list[_Layer] = []
        for i in range(args.num_layers):
            p = f"layers.{i}."
            bias = None
            if args.attention_bias:
                bias = torch.cat([tensors[p + "q_bias"], tensors[p + "k_bias"], tensors[p + "v_bias"]]).to(dtype)
            self.layers.append(_Layer(
                attn_norm=w(p + "attn_norm"),
                qkv=Linear(torch.cat([tensors[p + "q"], tensors[p + "k"], tensors[p + "v"]]).to(dtype), bias, q8),
                o=Linear(w(p + "o"), int8_max_rows=q8),
                mlp_norm=w(p + "mlp_norm"),
                gate_up=Linear(torch.cat([tensors[p + "gate"], tensors[p + "up"]]).to(dtype), int8_max_rows=q8),
                down=Linear(w(p + "down"), int8_max_rows=q8),
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
        a = self.args
        H, KV, hd = a.num_heads, a.num_kv_heads, a.head_dim
        G = H // KV
        inter = a.intermediate_size
        T = b.input_ids.shape[0]
        D = b.num_decode
        x = self.embed[b.input_ids]
        cos = self.cos[b.positions].unsqueeze(1)
        sin = self.signed_sin[b.positions].unsqueeze(1)
        # Grouped-query trick: the G query heads sharing a KV head become G*n queries of one
        # attention call, so K/V are never repeated. Masks are expanded once per step.
        dec_bt = b.decode_block_tables.reshape(-1)  # index_select is ~3x faster than advanced indexing
        dec_mask = b.decode_mask
        spans = [(s.start_row, s.num_tokens, s.context_len, s.block_ids, s.mask.repeat(G, 1)) for s in b.prefills]
        slots = b.slot_mapping
        for li, layer in enumerate(self.layers):
            h = F.rms_norm(x, (a.hidden_size,), layer.attn_norm, a.rms_norm_eps)
            qkv = layer.qkv(h)
            qk = qkv[:, : (H + KV) * hd].view(T, H + KV, hd)
            qk = qk * cos + qk.roll(hd // 2, dims=-1) * sin
            q = qk[:, :H]
            k_cache, v_cache = kv.k[li], kv.v[li]
            k_cache.view(-1, KV, hd).index_copy_(0, slots, qk[:, H:])
            v_cache.view(-1, KV, hd).index_copy_(0, slots, qkv[:, (H + KV) * hd:].view(T, KV, hd))
            attn = torch.empty((T, H * hd), dtype=x.dtype)
            if D:
                kg = k_cache.index_select(0, dec_bt).view(D, -1, KV, hd).transpose(1, 2)
                vg = v_cache.index_select(0, dec_bt).view(D, -1, KV, hd).transpose(1, 2)
                out = F.scaled_dot_product_attention(q[:D].reshape(D, KV, G, hd), kg, vg, attn_mask=dec_mask)
                attn[:D] = out.reshape(D, H * hd)
            for start, n, ctx, bids, mask in spans:
                kg = k_cache.index_select(0, bids).view(-1, KV, hd)[:ctx].transpose(0, 1)
                vg = v_cache.index_select(0, bids).view(-1, KV, hd)[:ctx].transpose(0, 1)
                qp = q[start:start + n].reshape(n, KV, G, hd).permute(1, 2, 0, 3).reshape(KV, G * n, hd)
                out = F.scaled_dot_product_attention(qp, kg, vg, attn_mask=mask)
                attn[start:start + n] = out.view(KV, G, n, hd).permute(2, 0, 1, 3).reshape(n, H * hd)
            x = x + layer.o(attn)
            h = F.rms_norm(x, (a.hidden_size,), layer.mlp_norm, a.rms_norm_eps)
            gu = layer.gate_up(h)
            x = x + layer.down(F.silu(gu[:, :inter]) * gu[:, inter:])
        x = F.rms_norm(x[b.logits_rows], (a.hidden_size,), self.final_norm, a.rms_norm_eps)
        return self.lm_head(x).float()
