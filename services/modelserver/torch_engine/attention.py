"""Attention of one step over the paged cache: the C++ kernel when built, plain torch otherwise.

The kernel (csrc/paged_attention.cpp) reads pages in place for every decode and prefill row at once. The
plain-torch path is the fallback and the tests' oracle: decodes gather their pages into one padded
batch with a length mask; a prefill chunk uses causal SDPA over its own new K/V, and when part of
its context is already cached, attends to that prefix separately and merges the two by
log-sum-exp (no [chunk x context] mask, no gather of the chunk itself).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

from .forward_batch import ForwardBatch
from .kv_cache import gather, write_kv

#: query rows (tokens x heads of one KV head) one kernel work item holds; bounds its scratch.
TILE_ROWS = 16
#: page sizes the C++ kernel is compiled for; other sizes run the plain-torch path.
KERNEL_BLOCK_SIZES = (16, 32, 64, 128)
#: the kernel's head_dim must be a multiple of this (its register blocks); others run plain torch.
KERNEL_HEAD_DIM_MULTIPLE = 16


def kernel_fits(block_size: int, head_dim: int) -> bool:
    return block_size in KERNEL_BLOCK_SIZES and head_dim % KERNEL_HEAD_DIM_MULTIPLE == 0


#: one layer's pages: k, v and, for an int8 cache, their per-token scales
Pages = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


@dataclass
class _Span:
    start: int
    n: int
    ctx: int
    block_ids: torch.Tensor  # [1, pages of the cached prefix]


class TorchAttention:
    """What the plain-torch path needs for one step, built once and used by every layer."""

    def __init__(self, b: ForwardBatch, num_heads: int, block_size: int) -> None:
        self.H = num_heads
        self.D = b.num_decode
        if self.D:
            lens = torch.tensor(b.context_lens[: self.D])
            width = -(-int(lens.max()) // block_size)
            self.dec_tables = b.block_tables[: self.D, :width].long()
            self.dec_mask = (torch.arange(width * block_size) < lens.unsqueeze(1)).view(self.D, 1, 1, -1)
        self.spans = []
        for s in range(self.D, len(b.context_lens)):
            start, end, ctx = b.seq_starts[s], b.seq_starts[s + 1], b.context_lens[s]
            cached = ctx - (end - start)
            ids = b.block_tables[s: s + 1, : -(-cached // block_size)].long()
            self.spans.append(_Span(start, end - start, ctx, ids))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, slots: torch.Tensor, k_scale: torch.Tensor | None = None,
                 v_scale: torch.Tensor | None = None) -> torch.Tensor:
        """q [T, H, hd], this step's k, v [T, KV, hd] (also written to the cache) -> [T, H, hd].
        With an int8 cache (scales given) every K/V row attended to, this step's included, is the
        stored int8 value times its scale, as in the kernel."""
        k, v = write_kv(k_cache, v_cache, k, v, slots, k_scale, v_scale)
        T, H, hd = q.shape
        KV = k.shape[1]
        out = torch.empty((T, H, hd), dtype=q.dtype)
        pages: Pages = (k_cache, v_cache, k_scale, v_scale)
        if self.D:
            kg, vg = gather(k_cache, v_cache, self.dec_tables, q.dtype, k_scale, v_scale)
            o = F.scaled_dot_product_attention(q[: self.D].view(self.D, KV, H // KV, hd), kg, vg,
                                               attn_mask=self.dec_mask)
            out[: self.D] = o.view(self.D, H, hd)
        for sp in self.spans:
            rows = slice(sp.start, sp.start + sp.n)
            out[rows] = _prefill(q[rows], k[rows], v[rows], pages, sp)
        return out


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pages: Pages, sp: _Span) -> torch.Tensor:
    """One chunk: causal attention within it, merged with attention to its cached prefix."""
    n, H, hd = q.shape
    KV = k.shape[1]
    G = H // KV
    qh, kh, vh = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, n, hd]
    cached = sp.ctx - n
    if cached == 0:
        return F.scaled_dot_product_attention(qh, kh, vh, is_causal=True, enable_gqa=True).transpose(0, 1)
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # noqa: SLF001 - the only op with LSE
    out_c, lse_c = flash(qh.unsqueeze(0), kh.repeat_interleave(G, 0).unsqueeze(0),
                         vh.repeat_interleave(G, 0).unsqueeze(0), 0.0, True)
    k_cache, v_cache, k_scale, v_scale = pages
    kp, vp = gather(k_cache, v_cache, sp.block_ids, q.dtype, k_scale, v_scale)
    qg = qh.reshape(KV, G * n, hd)  # every chunk query sees the whole prefix: fold the group into rows
    # the private flash op assumes unit stride in head_dim, which a one-page gather view lacks
    out_p, lse_p = flash(qg.unsqueeze(0), kp[:, :, :cached].contiguous(), vp[:, :, :cached].contiguous(), 0.0, False)
    lse_p = lse_p.reshape(H, n)
    lse_c = lse_c.reshape(H, n)
    m = torch.maximum(lse_p, lse_c)
    w_p = (lse_p - m).exp().unsqueeze(-1)
    w_c = (lse_c - m).exp().unsqueeze(-1)
    merged = (out_p.reshape(H, n, hd).float() * w_p + out_c.reshape(H, n, hd).float() * w_c) / (w_p + w_c)
    return merged.to(q.dtype).transpose(0, 1)


def kernel_attention(ops: ModuleType, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     b: ForwardBatch, k_scale: torch.Tensor | None = None,
                     v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """The C++ kernel over every row of the step; q [T, H, hd] already rotated, K/V already written."""
    out = torch.empty(q.shape, dtype=q.dtype)
    ops.paged_attention(out, q, k_cache, v_cache, b.block_tables, b.seq_starts_t, b.context_lens_t,
                        q.shape[-1] ** -0.5, TILE_ROWS, k_scale, v_scale)
    return out
