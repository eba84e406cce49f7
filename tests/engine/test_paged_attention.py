"""The C++ paged-attention kernel and the plain-torch path against a float64 reference.

Random block tables over a pool with garbage in every unused slot, context lengths straddling page
edges, decodes mixed with prefill chunks that follow a cached prefix, GQA ratios 1/3/4/8, head
dims 64/128, batches of 1-64 sequences, float32 and bfloat16, and the int8 cache (its scales per
token and KV head) against the same reference over the dequantized pool.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch

from services.modelserver.torch_engine import ops
from services.modelserver.torch_engine.attention import TILE_ROWS, TorchAttention, kernel_attention, kernel_fits
from services.modelserver.torch_engine.forward_batch import SeqSlice, build_forward_batch
from services.modelserver.torch_engine.kv_cache import dequantize_rows, quantize_rows, write_kv

OPS: Any = ops.load()
needs_ops = pytest.mark.skipif(OPS is None, reason=f"C++ ops not built: {ops.status()}")
TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make_step(rng: random.Random, n_seqs: int, kv: int, ratio: int, hd: int, bs: int, dtype: torch.dtype):
    """A pool with random contents, random page tables, and one step of decodes and prefill chunks."""
    slices, max_pages = [], 0
    for i in range(n_seqs):
        ctx = rng.choice([1, bs - 1, bs, bs + 1, 2 * bs + 1, rng.randint(1, 5 * bs)])
        n = 1 if i % 3 else rng.randint(1, ctx)  # two in three decode, the rest a chunk after a prefix
        slices.append((ctx, n))
        max_pages += -(-ctx // bs)
    pool = list(range(max_pages + 7))
    rng.shuffle(pool)
    seq_slices = []
    for ctx, n in slices:
        pages = [pool.pop() for _ in range(-(-ctx // bs))]
        seq_slices.append(SeqSlice([0] * n, ctx - n, pages, True))
    b = build_forward_batch(seq_slices, bs)
    g = torch.Generator().manual_seed(rng.randint(0, 1 << 30))
    nb = max_pages + 7
    k_cache = torch.randn((nb, kv, hd, bs), generator=g).to(dtype)
    v_cache = torch.randn((nb, kv, bs, hd), generator=g).to(dtype)
    q = torch.randn((b.num_tokens, kv * ratio, hd), generator=g).to(dtype)
    return b, q, k_cache, v_cache


def reference(b, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
    """Causal attention per sequence in float64, K/V read token by token through the page table."""
    bs = k_cache.shape[-1]
    H, hd = q.shape[1], q.shape[2]
    KV = k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for s, ctx in enumerate(b.context_lens):
        start, end = b.seq_starts[s], b.seq_starts[s + 1]
        p = torch.arange(ctx)
        blk = b.block_tables[s].long()[p // bs]
        k = k_cache[blk, :, :, p % bs].double().repeat_interleave(H // KV, 1)  # [ctx, H, hd]
        v = v_cache[blk, :, p % bs, :].double().repeat_interleave(H // KV, 1)
        qs = q[start:end].double()
        scores = torch.einsum("nhd,chd->hnc", qs, k) * hd ** -0.5
        q_pos = torch.arange(ctx - (end - start), ctx).unsqueeze(1)
        scores = scores.masked_fill(p.unsqueeze(0) > q_pos, float("-inf"))
        out[start:end] = torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)
    return out


def new_kv(b, k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """This step's K/V as the layer computed them: what the pool already holds at their slots."""
    bs = k_cache.shape[-1]
    blk, off = b.slot_mapping // bs, b.slot_mapping % bs
    return k_cache[blk, :, :, off].clone(), v_cache[blk, :, off, :].clone()


CASES = [(kv, ratio, hd, bs, n, dtype)
         for kv, ratio, hd, bs, n, dtype in [
             (3, 3, 64, 64, 64, torch.bfloat16), (1, 8, 128, 64, 16, torch.bfloat16),
             (2, 4, 64, 64, 5, torch.float32), (4, 1, 128, 64, 1, torch.float32),
             (3, 3, 64, 16, 24, torch.float32), (2, 4, 128, 128, 7, torch.bfloat16),
             (1, 3, 64, 32, 33, torch.bfloat16), (8, 1, 64, 64, 40, torch.bfloat16)]]


@needs_ops
@pytest.mark.parametrize("int8", [False, True], ids=["float-cache", "int8-cache"])
@pytest.mark.parametrize(("kv", "ratio", "hd", "bs", "n_seqs", "dtype"), CASES)
def test_kernel_matches_reference(kv, ratio, hd, bs, n_seqs, dtype, int8):
    """Float pages, or int8 pages with their scales against the reference over the dequantized pool."""
    rng = random.Random(hash((kv, ratio, hd, bs, n_seqs, int8)) & 0xFFFF)
    b, q, k_cache, v_cache = make_step(rng, n_seqs, kv, ratio, hd, bs, dtype)
    scales: tuple = (None, None)
    want_k, want_v = k_cache, v_cache
    if int8:
        k_cache, v_cache, ks, vs, want_k, want_v = quantize_pool(k_cache, v_cache)
        scales = (ks, vs)
    out = torch.empty_like(q)
    OPS.paged_attention(out, q, k_cache, v_cache, b.block_tables, b.seq_starts_t, b.context_lens_t, hd ** -0.5,
                        TILE_ROWS, *scales)
    want = reference(b, q, want_k, want_v)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize(("kv", "ratio", "hd", "bs", "n_seqs", "dtype"), CASES[:5])
def test_torch_path_matches_reference(kv, ratio, hd, bs, n_seqs, dtype):
    rng = random.Random(7 + n_seqs)
    b, q, k_cache, v_cache = make_step(rng, n_seqs, kv, ratio, hd, bs, dtype)
    k, v = new_kv(b, k_cache, v_cache)
    out = TorchAttention(b, q.shape[1], bs)(q, k, v, k_cache, v_cache, b.slot_mapping)
    want = reference(b, q, k_cache, v_cache)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype] * 2, rtol=TOL[dtype])


def quantize_pool(k_cache: torch.Tensor, v_cache: torch.Tensor):
    """int8 pages and per-token scales of a float pool, and the pool they dequantize to."""
    kq, ks = quantize_rows(k_cache.float().transpose(2, 3))  # K pages are [hd, B]: rows per token
    vq, vs = quantize_rows(v_cache.float())
    k_deq = dequantize_rows(kq, ks, torch.float32).transpose(2, 3)
    return kq.transpose(2, 3).contiguous(), vq, ks, vs, k_deq, dequantize_rows(vq, vs, torch.float32)


@pytest.mark.parametrize(("kv", "ratio", "hd", "bs", "n_seqs", "dtype"), CASES[:5])
def test_int8_cache_torch_path_matches_reference(kv, ratio, hd, bs, n_seqs, dtype):
    rng = random.Random(11 + n_seqs)
    b, q, k_cache, v_cache = make_step(rng, n_seqs, kv, ratio, hd, bs, dtype)
    kq, vq, ks, vs, k_deq, v_deq = quantize_pool(k_cache, v_cache)
    k, v = new_kv(b, k_deq.to(dtype), v_deq.to(dtype))  # re-quantizing a dequantized row gives it back
    out = TorchAttention(b, q.shape[1], bs)(q, k, v, kq, vq, b.slot_mapping, ks, vs)
    want = reference(b, q, k_deq, v_deq)
    torch.testing.assert_close(out.double(), want, atol=TOL[dtype] * 2, rtol=TOL[dtype])


@needs_ops
@pytest.mark.parametrize("int8", [False, True])
def test_kernel_rows_do_not_depend_on_batch_or_tiling(int8):
    """A row's result is bit-identical alone, in a big batch, and under another tile size; with the
    int8 cache the decode walk (int8 read in place) and the prefill blocks give the same row too."""
    rng = random.Random(3)
    b, q, k_cache, v_cache = make_step(rng, 20, 3, 3, 64, 64, torch.bfloat16)
    scales: tuple = (None, None)
    if int8:
        k_cache, v_cache, ks, vs, _, _ = quantize_pool(k_cache, v_cache)
        scales = (ks, vs)
    full = torch.empty_like(q)
    OPS.paged_attention(full, q, k_cache, v_cache, b.block_tables, b.seq_starts_t, b.context_lens_t, 0.125, 16,
                        *scales)
    other = torch.empty_like(q)
    OPS.paged_attention(other, q, k_cache, v_cache, b.block_tables, b.seq_starts_t, b.context_lens_t, 0.125, 3,
                        *scales)
    assert torch.equal(full, other)
    s = len(b.context_lens) - 1  # the last sequence, alone, as decodes of its last token only
    end = b.seq_starts[s + 1]
    assert end - b.seq_starts[s] > 1  # it was a prefill chunk in the batch
    alone = torch.empty_like(q[end - 1:end])
    OPS.paged_attention(alone, q[end - 1:end], k_cache, v_cache, b.block_tables[s:s + 1],
                        torch.tensor([0, 1], dtype=torch.int32), b.context_lens_t[s:s + 1], 0.125, 16, *scales)
    assert torch.equal(alone[0], full[end - 1])


@needs_ops
def test_int8_cache_is_refused_without_its_scales():
    b = build_forward_batch([SeqSlice([0], 0, [0], True)], 16)
    q = torch.zeros(1, 2, 64)
    kc, vc = torch.zeros(2, 1, 64, 16, dtype=torch.int8), torch.zeros(2, 1, 16, 64, dtype=torch.int8)
    with pytest.raises(RuntimeError, match="needs k_scale and v_scale"):
        kernel_attention(OPS, q, kc, vc, b)
    bad = torch.zeros(2, 1, 8)
    with pytest.raises(RuntimeError, match="scales must be float32"):
        kernel_attention(OPS, q, kc, vc, b, bad, bad)


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_and_cache_matches_torch(dtype):
    T, H, KV, hd, bs, nb = 37, 6, 2, 64, 16, 9
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn((T, (H + 2 * KV) * hd), generator=g).to(dtype)
    cos = torch.randn((100, hd), generator=g).to(dtype)
    sin = torch.randn((100, hd), generator=g).to(dtype)
    pos = torch.randint(0, 100, (T,), generator=g)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    kc, vc = torch.zeros((nb, KV, hd, bs), dtype=dtype), torch.zeros((nb, KV, bs, hd), dtype=dtype)
    q = torch.empty((T, H, hd), dtype=dtype)
    OPS.rope_and_cache(qkv, cos, sin, pos, slots, q, kc, vc)
    x = qkv[:, : (H + KV) * hd].view(T, H + KV, hd).float()
    c, s = cos[pos].float().unsqueeze(1), sin[pos].float().unsqueeze(1)
    rot = (x * c + x.roll(hd // 2, dims=-1) * s).to(dtype)
    kc_ref, vc_ref = torch.zeros_like(kc), torch.zeros_like(vc)
    write_kv(kc_ref, vc_ref, rot[:, H:], qkv[:, (H + KV) * hd:].view(T, KV, hd), slots)
    tol = TOL[dtype]
    torch.testing.assert_close(q.float(), rot[:, :H].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(kc.float(), kc_ref.float(), atol=tol, rtol=tol)
    assert torch.equal(vc, vc_ref)

    # int8 cache: each K/V row quantized on write with its own scale, as write_kv does
    kq, vq = torch.zeros_like(kc, dtype=torch.int8), torch.zeros_like(vc, dtype=torch.int8)
    ks, vs = torch.zeros((nb, KV, bs)), torch.zeros((nb, KV, bs))
    OPS.rope_and_cache(qkv, cos, sin, pos, slots, q, kq, vq, ks, vs)
    kq_ref, vq_ref = torch.zeros_like(kq), torch.zeros_like(vq)
    ks_ref, vs_ref = torch.zeros_like(ks), torch.zeros_like(vs)
    write_kv(kq_ref, vq_ref, rot[:, H:], qkv[:, (H + KV) * hd:].view(T, KV, hd), slots, ks_ref, vs_ref)
    assert torch.equal(vq, vq_ref) and torch.equal(vs, vs_ref)  # V is not rotated: the same bytes
    torch.testing.assert_close(ks, ks_ref, atol=0, rtol=tol)
    # K went through RoPE, where a fused multiply-add may move the last bit: at most one step apart
    assert (kq.int() - kq_ref.int()).abs().max() <= 1
    assert (kq != kq_ref).float().mean() < 0.01


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(dtype):
    gu = (torch.randn((9, 2 * 300)) * 4).to(dtype)
    out = torch.empty((9, 300), dtype=dtype)
    OPS.silu_and_mul(gu, out)
    want = torch.nn.functional.silu(gu[:, :300].float()) * gu[:, 300:].float()
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])


@needs_ops
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_matches_torch(dtype):
    g = torch.Generator().manual_seed(2)
    x = torch.randn((7, 576), generator=g).to(dtype)
    delta = torch.randn((7, 576), generator=g).to(dtype)
    w = torch.randn(576, generator=g).to(dtype)
    want_x = x + delta
    want = torch.nn.functional.rms_norm(want_x.float(), (576,), w.float(), 1e-5)
    out = torch.empty_like(x)
    OPS.add_rms_norm(x, delta, w, 1e-5, out)
    assert torch.equal(x, want_x)
    torch.testing.assert_close(out.float(), want, atol=TOL[dtype] * 4, rtol=TOL[dtype])
    OPS.add_rms_norm(x, None, w, 1e-5, out)  # no residual: x unchanged
    assert torch.equal(x, want_x)


@needs_ops
def test_head_dim_outside_the_register_blocks_is_refused_and_routed_to_torch():
    """The kernel holds rows in 16-float register blocks; other head dims take the plain-torch path."""
    assert kernel_fits(64, 64) and kernel_fits(16, 128)
    assert not kernel_fits(64, 40) and not kernel_fits(48, 64)
    q = torch.zeros(1, 2, 40)
    kc, vc = torch.zeros(2, 1, 40, 16), torch.zeros(2, 1, 16, 40)
    b = build_forward_batch([SeqSlice([0], 0, [0], True)], 16)
    with pytest.raises(RuntimeError, match="head_dim must be a multiple of 16"):
        kernel_attention(OPS, q, kc, vc, b)
