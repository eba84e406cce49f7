"""The tier's writer against a real redis-server: every pinned block is released exactly once
(written or not) and the engine is told, so an idle engine unpins at once - pins count as used KV
in load reports, and routers steer away from a server whose pool looks full."""

from __future__ import annotations

import torch

from services.cache import keys, runtime
from services.cache.block_format import BlockShape
from services.cache.kv_tier import BlockRef, KvTier

SHAPE = BlockShape(torch.float32, 4, 2, 1, 8)  # 4-token pages, 2 layers, 1 KV head, head dim 8


def _tier(store_url: str) -> KvTier:
    store = runtime.store()
    assert store is not None
    n = 6
    k = torch.randn(SHAPE.layers, n, SHAPE.kv_heads, SHAPE.head_dim, SHAPE.block_size)
    v = torch.randn(SHAPE.layers, n, SHAPE.kv_heads, SHAPE.block_size, SHAPE.head_dim)
    return KvTier(store, "tiny", b"ns" * 16, SHAPE, k, v)


def _refs(tokens: list[list[int]]) -> list[BlockRef]:
    parent, out = b"ns" * 16, []
    for block, toks in enumerate(tokens):
        key = keys.block_key(parent, toks, b"")
        out.append(BlockRef(key, parent, b"", tuple(toks), block))
        parent = key
    return out


def test_written_blocks_are_released_once_and_the_engine_woken(store_url: str):
    tier = _tier(store_url)
    woken: list[int] = []
    tier.on_released = lambda: woken.append(len(tier.released))
    try:
        refs = _refs([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]])
        assert tier.offer(refs) == refs
        assert tier.wait_writes(30)
        assert woken and woken[-1] == 3
        assert sorted(tier.drain_released()) == [0, 1, 2]
        assert tier.drain_released() == [] and tier._pending == 0  # noqa: SLF001
        got = tier.fetch(refs)
        assert len(got) == 3 and torch.equal(got[1][0], tier._k[:, 1])  # noqa: SLF001
        assert tier.cpu_s["write"] > 0 and tier.cpu_s["offer"] > 0 and tier.cpu_s["read"] > 0
    finally:
        tier.close()


def test_a_block_that_cannot_be_encoded_is_released_once_and_not_written(store_url: str):
    tier = _tier(store_url)
    try:
        good, bad = _refs([[1, 2, 3, 4], [5, 6, 7, 8]])
        bad = BlockRef(bad.key, bad.parent, bad.salt, (5, 6, 7), bad.block)  # 3 tokens in a 4-token page
        assert len(tier.offer([good, bad])) == 2
        assert tier.wait_writes(30)
        assert sorted(tier.drain_released()) == [0, 1]
        assert tier._pending == 0  # noqa: SLF001
        assert tier.known(good.key) and not tier.known(bad.key)
        assert len(tier.fetch([good])) == 1
    finally:
        tier.close()
