"""The stored form of one KV block, versioned, and its check on the way back.

    magic "MSKV" | version u16 | dtype u8 | layout u8 | block_size u16 | layers u16 | kv_heads u16 |
    head_dim u16 | key 32 B | parent 32 B | token ids (block_size x u32 LE) | K bytes | V bytes

K is [layers, kv_heads, head_dim, block_size] and V [layers, kv_heads, block_size, head_dim]: one
block's slice of the engine's head-major pool, copied as is. An int8 pool (dtype int8) stores
after them its per-token scales, K's then V's, float32 [layers, kv_heads, block_size]. A block read
back is used only if every field matches what the reader expects - version, dtype, layout, shapes,
its own key, its parent's key and the very token ids of the request - so a hash collision, a
foreign writer or a torn value can cost a recompute, never wrong KV.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .keys import KEY_BYTES, token_bytes

MAGIC = b"MSKV"
VERSION = 1
LAYOUT_HEAD_MAJOR = 1
_DTYPES: dict[torch.dtype, int] = {torch.float32: 1, torch.bfloat16: 2, torch.float16: 3, torch.int8: 4}
_HEADER = struct.Struct(f"<4sHBBHHHH{KEY_BYTES}s{KEY_BYTES}s")


@dataclass(frozen=True)
class BlockShape:
    """What a block of one engine looks like; writer and reader must agree on all of it."""

    dtype: torch.dtype
    block_size: int
    layers: int
    kv_heads: int
    head_dim: int

    @property
    def elements(self) -> int:
        """Elements of K (and of V) in one block."""
        return self.layers * self.kv_heads * self.head_dim * self.block_size

    @property
    def k_shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.head_dim, self.block_size)

    @property
    def v_shape(self) -> tuple[int, int, int, int]:
        return (self.layers, self.kv_heads, self.block_size, self.head_dim)

    @property
    def parts(self) -> list[tuple[torch.dtype, tuple[int, ...]]]:
        """The tensors of one block in stored order: K, V, and for int8 their scales."""
        out: list[tuple[torch.dtype, tuple[int, ...]]] = [(self.dtype, self.k_shape), (self.dtype, self.v_shape)]
        if self.dtype == torch.int8:
            scales = (self.layers, self.kv_heads, self.block_size)
            out += [(torch.float32, scales), (torch.float32, scales)]
        return out

    def nbytes(self) -> int:
        return _HEADER.size + 4 * self.block_size + sum(math.prod(shape) * dt.itemsize for dt, shape in self.parts)


class BlockMismatch(ValueError):
    """A stored value is not the block asked for (another version, shape, key or tokens)."""


def encode(shape: BlockShape, key: bytes, parent: bytes, tokens: Sequence[int], *parts: torch.Tensor) -> bytearray:
    """One block's bytes from its parts (K, V[, K scales, V scales]; views into the pool are fine),
    copied once, straight into the value (on a 2-core server every copy of 3 MiB competes with the
    step loop)."""
    want = shape.parts
    if len(tokens) != shape.block_size or len(parts) != len(want) or any(
            tuple(t.shape) != s or t.dtype != dt for t, (dt, s) in zip(parts, want, strict=True)):
        raise ValueError("block does not have the declared shape")
    out = bytearray(shape.nbytes())
    _HEADER.pack_into(out, 0, MAGIC, VERSION, _DTYPES[shape.dtype], LAYOUT_HEAD_MAJOR, shape.block_size,
                      shape.layers, shape.kv_heads, shape.head_dim, key, parent)
    off = _HEADER.size + 4 * shape.block_size
    out[_HEADER.size:off] = token_bytes(tokens)
    for t, (dt, s) in zip(parts, want, strict=True):
        n = math.prod(s)
        torch.frombuffer(out, dtype=dt, count=n, offset=off).view(s).copy_(t)
        off += n * dt.itemsize
    return out


def decode(shape: BlockShape, data: bytes | bytearray, key: bytes, parent: bytes,
           tokens: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """The block's parts (K, V[, K scales, V scales]), or BlockMismatch saying which field differs."""
    if len(data) != shape.nbytes():
        raise BlockMismatch(f"size {len(data)} != {shape.nbytes()}")
    magic, version, dtype, layout, bs, layers, kvh, hd, got_key, got_parent = _HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise BlockMismatch(f"format {magic!r} v{version}, this reader knows v{VERSION}")
    if (dtype, layout, bs, layers, kvh, hd) != (_DTYPES[shape.dtype], LAYOUT_HEAD_MAJOR, shape.block_size,
                                                shape.layers, shape.kv_heads, shape.head_dim):
        raise BlockMismatch("dtype, layout or shape differs")
    if got_key != key or got_parent != parent:
        raise BlockMismatch("key or parent key differs")
    off = _HEADER.size
    tok_end = off + 4 * shape.block_size
    if data[off:tok_end] != token_bytes(tokens):
        raise BlockMismatch("token ids differ (hash collision or foreign writer)")
    buf = bytearray(data[tok_end:])  # writable: the tensors are copied into the pool from it
    parts, off = [], 0
    for dt, s in shape.parts:
        n = math.prod(s)
        parts.append(torch.frombuffer(buf, dtype=dt, count=n, offset=off).view(s))
        off += n * dt.itemsize
    return tuple(parts)
