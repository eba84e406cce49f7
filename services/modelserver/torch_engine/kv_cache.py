"""The paged KV cache: a fixed pool of pages per layer, head-major so one page of one KV head is contiguous.

    k [layers, blocks, kv_heads, head_dim, block_size]   K transposed inside a page
    v [layers, blocks, kv_heads, block_size, head_dim]

Why this layout: attention for one (sequence, KV head) streams whole pages with unit stride, all
query heads of the group share each page read (grouped-query attention without repeating K/V),
and the Q.K loop runs over the page's tokens (K^T) while the P.V loop runs over head_dim (V).
Head-major 64-token pages measured 1.3-2x faster than token-major 16-token ones.

The 8-bit option (`kv_cache_dtype=int8`) stores K and V as int8 with one float32 scale per token
and KV head (symmetric, scale = max |x| / 127), in k_scale / v_scale [layers, blocks, kv_heads,
block_size]: decode attention is bound by the K/V bytes it reads, which this cuts ~3.8x from float32
(64-dim heads: 68 bytes per token and head instead of 256). A per-token scale factors out of both
loops: Q.K sums int8 K times q, then scales the token's score; P.V folds the scale into the weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .weights import ModelArgs

#: the cache's element types besides the model's own dtype ("auto")
KV_DTYPES = {"int8": torch.int8}


@dataclass
class KVCache:
    k: torch.Tensor
    v: torch.Tensor
    block_size: int
    k_scale: torch.Tensor | None = None  # int8 pools only: [layers, blocks, kv_heads, block_size]
    v_scale: torch.Tensor | None = None

    @property
    def num_blocks(self) -> int:
        return self.k.shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None

    @property
    def pools(self) -> list[torch.Tensor]:
        """Every tensor of the pool, each indexed [layer, block, ...]: what moves when a block is copied."""
        if self.k_scale is None or self.v_scale is None:
            return [self.k, self.v]
        return [self.k, self.v, self.k_scale, self.v_scale]

    def layer(self, li: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One layer's k, v pages and their scales (None unless int8)."""
        ks = None if self.k_scale is None else self.k_scale[li]
        vs = None if self.v_scale is None else self.v_scale[li]
        return self.k[li], self.v[li], ks, vs

    @staticmethod
    def bytes_per_block(args: ModelArgs, block_size: int, dtype: torch.dtype, kv_dtype: str = "auto") -> int:
        per_token_head = args.head_dim * torch.empty((), dtype=dtype).element_size()
        if kv_dtype == "int8":
            per_token_head = args.head_dim + 4  # int8 values and a float32 scale
        return 2 * args.num_layers * block_size * args.num_kv_heads * per_token_head

    @classmethod
    def allocate(cls, args: ModelArgs, num_blocks: int, block_size: int, dtype: torch.dtype,
                 kv_dtype: str = "auto") -> KVCache:
        L, KV, hd = args.num_layers, args.num_kv_heads, args.head_dim
        if kv_dtype == "auto":
            k = torch.zeros((L, num_blocks, KV, hd, block_size), dtype=dtype)
            v = torch.zeros((L, num_blocks, KV, block_size, hd), dtype=dtype)
            return cls(k, v, block_size)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_cache_dtype must be auto or one of {sorted(KV_DTYPES)}, got {kv_dtype!r}")
        k = torch.zeros((L, num_blocks, KV, hd, block_size), dtype=torch.int8)
        v = torch.zeros((L, num_blocks, KV, block_size, hd), dtype=torch.int8)
        ks = torch.zeros((L, num_blocks, KV, block_size), dtype=torch.float32)
        return cls(k, v, block_size, ks, ks.clone())


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 over the last dim: x ~= q * scale[..., None], scale = max |x| / 127 (0 for a zero row).

    The C++ cache write computes exactly this (same division, round half to even), so the kernel
    and this path store the same bytes for the same float inputs."""
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(xf / safe.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_rows(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.unsqueeze(-1)).to(dtype)


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-torch write of k, v [T, KV, hd] into one layer's pages at flat slots (block * B + offset).
    Returns k, v as the pages now hold them (an int8 cache's rounded values, in k's dtype)."""
    B = k_cache.shape[-1]
    blk, off = slots // B, slots % B
    if k_scale is None or v_scale is None:
        k_cache[blk, :, :, off] = k
        v_cache[blk, :, off, :] = v
        return k, v
    kq, ks = quantize_rows(k)
    vq, vs = quantize_rows(v)
    k_cache[blk, :, :, off] = kq
    v_cache[blk, :, off, :] = vq
    k_scale[blk, :, off] = ks
    v_scale[blk, :, off] = vs
    return dequantize_rows(kq, ks, k.dtype), dequantize_rows(vq, vs, v.dtype)


def gather(k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, dtype: torch.dtype,
           k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """K and V of the pages `block_ids` [N, W] as [N, KV, W * B, hd] in `dtype` (the plain-torch path's copy)."""
    n, w = block_ids.shape
    _, KV, hd, B = k_cache.shape
    flat = block_ids.reshape(-1)
    k = k_cache.index_select(0, flat).view(n, w, KV, hd, B).permute(0, 2, 1, 4, 3).reshape(n, KV, w * B, hd)
    v = v_cache.index_select(0, flat).view(n, w, KV, B, hd).permute(0, 2, 1, 3, 4).reshape(n, KV, w * B, hd)
    if k_scale is None or v_scale is None:
        return k, v
    ks = k_scale.index_select(0, flat).view(n, w, KV, B).permute(0, 2, 1, 3).reshape(n, KV, w * B)
    vs = v_scale.index_select(0, flat).view(n, w, KV, B).permute(0, 2, 1, 3).reshape(n, KV, w * B)
    return dequantize_rows(k, ks, dtype), dequantize_rows(v, vs, dtype)
