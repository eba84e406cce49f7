"""Block manager: reference counts, hash chaining, LRU eviction, and a pool that never grows."""

from __future__ import annotations

import random

import pytest

from services.modelserver.torch_engine.block_manager import BlockManager, hash_block


def test_hash_chains_over_parent():
    a = hash_block(None, [1, 2, 3, 4])
    assert a == hash_block(None, [1, 2, 3, 4])
    assert a != hash_block(None, [1, 2, 3, 5])
    # same tokens after a different prefix are a different block
    assert hash_block(a, [9, 9, 9, 9]) != hash_block(hash_block(None, [0, 0, 0, 0]), [9, 9, 9, 9])


def test_refcounts_and_sharing():
    bm = BlockManager(num_blocks=4, block_size=4)
    blocks = bm.allocate(2)
    h = [hash_block(None, [1, 2, 3, 4]), hash_block(hash_block(None, [1, 2, 3, 4]), [5, 6, 7, 8])]
    bm.commit(blocks, h, 0, 2)
    hits = bm.match_prefix(h)
    assert hits == blocks
    shared = bm.take_hits(hits)
    assert [bm.ref_counts[b] for b in shared] == [2, 2]
    bm.free(blocks)
    assert bm.num_used == 2  # still referenced by the second owner
    bm.free(shared)
    assert bm.num_used == 0 and bm.num_free == 4
    # unreferenced but cached: a later request still hits them
    assert bm.match_prefix(h) == blocks
    with pytest.raises(RuntimeError):
        bm.free(blocks)


def test_lru_eviction_prefers_unhashed_then_oldest_freed():
    bm = BlockManager(num_blocks=3, block_size=2)
    a, b, c = bm.allocate(3)
    ha, hb = hash_block(None, [1, 1]), hash_block(None, [2, 2])
    bm.commit([a], [ha], 0, 1)
    bm.commit([b], [hb], 0, 1)
    bm.free([a])  # freed first: evicted first among cached
    bm.free([b])
    bm.free([c])  # unhashed: reused before any cached block
    assert bm.allocate(1) == [c]
    assert bm.match_prefix([ha]) == [a]
    assert bm.allocate(1) == [a]  # evicts the least recently freed cached block
    assert bm.match_prefix([ha]) == [] and bm.match_prefix([hb]) == [b]


def test_hit_on_free_block_counts_against_capacity():
    bm = BlockManager(num_blocks=2, block_size=2)
    (a,) = bm.allocate(1)
    h = hash_block(None, [7, 7])
    bm.commit([a], [h], 0, 1)
    bm.free([a])
    hits = bm.match_prefix([h])
    assert bm.can_allocate(1, hits)
    assert not bm.can_allocate(2, hits)  # the hit itself leaves the free queue


def test_duplicate_block_stays_private():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = bm.allocate(2)
    h = hash_block(None, [3, 3])
    bm.commit([a], [h], 0, 1)
    bm.commit([b], [h], 0, 1)
    assert bm.match_prefix([h]) == [a] and bm.block_hash[b] is None


def test_pool_never_exceeded_under_random_load():
    rng = random.Random(0)
    bm = BlockManager(num_blocks=16, block_size=2)
    owners: list[list[int]] = []
    for _ in range(2000):
        if owners and rng.random() < 0.4:
            bm.free(owners.pop(rng.randrange(len(owners))))
        else:
            n = rng.randint(1, 5)
            toks = [rng.randint(0, 3) for _ in range(2 * n)]
            hashes, parent = [], None
            for i in range(n):
                parent = hash_block(parent, toks[2 * i:2 * i + 2])
                hashes.append(parent)
            hits = bm.match_prefix(hashes[:-1])
            need = n - len(hits)
            if bm.can_allocate(need, hits):
                blocks = bm.take_hits(hits) + bm.allocate(need)
                bm.commit(blocks, hashes, len(hits), n)
                owners.append(blocks)
            else:
                with pytest.raises(RuntimeError):
                    if need > bm.num_free:
                        bm.allocate(need)
                    else:
                        raise RuntimeError("hits made it not fit")
        held = sum(len(o) for o in owners)
        assert bm.num_used <= bm.num_blocks
        assert bm.num_used + bm.num_free == bm.num_blocks
        assert sum(bm.ref_counts) == held
        assert all(rc >= 0 for rc in bm.ref_counts)
    assert bm.num_cached > 0


def test_hit_rate_stats():
    bm = BlockManager(num_blocks=2, block_size=4)
    bm.record_lookup(10, 0)
    bm.record_lookup(10, 8)
    assert bm.hit_rate == pytest.approx(0.4)
