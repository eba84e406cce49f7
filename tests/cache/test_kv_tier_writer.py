"""The tier's writer against a real redis-server: every pinned block is released exactly once
(written or not) and the engine is told, so an idle engine unpins at once - pins count as used KV
in load reports, and routers steer away from a server whose pool looks full."""

from __future__ import annotations

from pathlib import Path

import torch

from services.cache import events, keys, runtime
from services.cache.block_format import BlockShape
from services.cache.kv_tier import BlockRef, KvTier
from tests.helpers import wait_for
from tests.redis_server import RedisServer

SHAPE = BlockShape(torch.float32, 4, 2, 1, 8)  # 4-token pages, 2 layers, 1 KV head, head dim 8


def _tier(store_url: str) -> KvTier:
    store = runtime.store()
    assert store is not None
    n = 6
    k = torch.randn(SHAPE.layers, n, SHAPE.kv_heads, SHAPE.head_dim, SHAPE.block_size)
    v = torch.randn(SHAPE.layers, n, SHAPE.kv_heads, SHAPE.block_size, SHAPE.head_dim)
    return KvTier(store, "tiny", b"ns" * 16, SHAPE, [k, v])


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
        assert len(got) == 3 and torch.equal(got[1][0], tier._pools[0][:, 1])  # noqa: SLF001
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


def test_blocks_the_store_evicts_go_out_as_removed_events(tmp_path: Path):
    """A store smaller than what is written evicts (allkeys-lru); the tier hears of it from the
    store's keyspace notifications and says `removed` (shared), so routers stop crediting them."""
    server = RedisServer(tmp_path, maxmemory=4 << 20)
    server.start()
    runtime.configure(server.url, secret="test-secret")
    store = runtime.store()
    assert store is not None
    log = events.EventLog()
    k = torch.randn(SHAPE.layers, 6, SHAPE.kv_heads, SHAPE.head_dim, SHAPE.block_size)
    v = torch.randn(SHAPE.layers, 6, SHAPE.kv_heads, SHAPE.block_size, SHAPE.head_dim)
    tier = KvTier(store, "tiny", b"ns" * 16, SHAPE, [k, v], log)
    client = server.client()
    try:
        refs = _refs([[1, 2, 3, 4], [5, 6, 7, 8]])
        tier.offer(refs)
        assert tier.wait_writes(30) and all(tier.known(r.key) for r in refs)
        names = [tier.name(r) for r in refs]
        filler = b"x" * (256 << 10)
        for i in range(200):  # fill the store until LRU has evicted both blocks
            if not any(client.exists(n) for n in names):
                break
            client.set(f"filler-{i}", filler)
        assert not any(client.exists(n) for n in names), "the store never evicted the blocks"
        wait_for(lambda: not any(tier.known(r.key) for r in refs), 20, "the tier to hear of the evictions")
        removed = {key for e in log.read(0).events if e.kind == events.REMOVED and e.tier == events.SHARED
                   for key in e.keys}
        assert removed == {r.key for r in refs}
        assert log.sizes()[1] == 0
    finally:
        tier.close()
        client.close()
        runtime.configure("")
        server.stop()


def test_int8_pool_blocks_round_trip_with_their_scales(store_url: str):
    """An int8 pool's block carries its K and V scales through the real store and back."""
    store = runtime.store()
    assert store is not None
    shape = BlockShape(torch.int8, 4, 2, 1, 8)
    n = 3
    k = torch.randint(-127, 128, (2, n, 1, 8, 4), dtype=torch.int8)
    v = torch.randint(-127, 128, (2, n, 1, 4, 8), dtype=torch.int8)
    ks, vs = torch.rand(2, n, 1, 4), torch.rand(2, n, 1, 4)
    tier = KvTier(store, "tiny8", b"n8" * 16, shape, [k, v, ks, vs])
    try:
        refs = _refs([[1, 2, 3, 4], [5, 6, 7, 8]])
        assert tier.offer(refs) == refs and tier.wait_writes(30)
        got = tier.fetch(refs)
        assert len(got) == 2
        for block, parts in enumerate(got):
            assert all(torch.equal(p, pool[:, block]) for p, pool in zip(parts, (k, v, ks, vs), strict=True))
    finally:
        tier.close()
