"""Canonical keys, the block format and the event log: pure functions, no store, no model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from services.cache import block_format, keys
from services.cache.block_format import BlockMismatch, BlockShape
from services.cache.events import CLEARED, LOCAL, REMOVED, SHARED, STORED, EventLog
from tests.helpers import REPO

NS = keys.namespace("weights", "torch.float32", "layout", 4)
SALT = keys.tenant_salt("acme", b"secret")


def test_keys_are_the_same_in_every_process():
    """Seedless: another interpreter with another hash seed computes the same chain."""
    code = ("from services.cache import keys; ns = keys.namespace('weights', 'torch.float32', 'layout', 4); "
            "print(keys.chain(ns, list(range(12)), 4, keys.tenant_salt('acme', b'secret'))[-1].hex())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""}).stdout.strip()
    assert out == keys.chain(NS, list(range(12)), 4, SALT)[-1].hex()


def test_every_input_changes_the_key():
    base = keys.chain(NS, [1, 2, 3, 4], 4, SALT)
    assert len(base) == 1 and len(base[0]) == 32
    assert keys.chain(NS, [1, 2, 3, 5], 4, SALT) != base
    assert keys.chain(keys.namespace("weights2", "torch.float32", "layout", 4), [1, 2, 3, 4], 4, SALT) != base
    assert keys.chain(keys.namespace("weights", "torch.bfloat16", "layout", 4), [1, 2, 3, 4], 4, SALT) != base
    assert keys.chain(keys.namespace("weights", "torch.float32", "other", 4), [1, 2, 3, 4], 4, SALT) != base
    assert keys.chain(NS, [1, 2, 3, 4], 4, keys.tenant_salt("other", b"secret")) != base
    assert keys.chain(NS, [1, 2, 3, 4], 4, keys.tenant_salt("acme", b"another secret")) != base
    # fixed width: token 256 is not tokens (0, 1) run together
    assert keys.block_key(NS, [256], SALT) != keys.block_key(NS, [0, 1], SALT)


def test_chain_covers_the_whole_prefix_and_public_blocks_are_shared():
    a = keys.chain(NS, [1, 2, 3, 4, 5, 6, 7, 8], 4, SALT)
    b = keys.chain(NS, [9, 2, 3, 4, 5, 6, 7, 8], 4, SALT)
    assert a[1] != b[1]  # same second block, other first block: another key
    other = keys.tenant_salt("globex", b"secret")
    pa = keys.chain(NS, [1, 2, 3, 4, 5, 6, 7, 8], 4, SALT, public_blocks=1)
    pb = keys.chain(NS, [1, 2, 3, 4, 5, 6, 7, 8], 4, other, public_blocks=1)
    assert pa[0] == pb[0] and pa[1] != pb[1]
    assert keys.chain(NS, [1, 2, 3, 4, 5, 6, 7, 8], 4, SALT, start=1, parent=a[0]) == a[1:]


def _shape() -> BlockShape:
    return BlockShape(torch.float32, block_size=4, layers=2, kv_heads=1, head_dim=3)


def test_block_round_trip_and_every_mismatch_is_rejected():
    shape = _shape()
    k, v = torch.randn(shape.k_shape), torch.randn(shape.v_shape)
    key, parent, tokens = keys.block_key(NS, [1, 2, 3, 4], SALT), NS, [1, 2, 3, 4]
    data = block_format.encode(shape, key, parent, tokens, k, v)
    assert len(data) == shape.nbytes()
    k2, v2 = block_format.decode(shape, data, key, parent, tokens)
    assert torch.equal(k, k2) and torch.equal(v, v2)
    with pytest.raises(BlockMismatch, match="token ids"):
        block_format.decode(shape, data, key, parent, [1, 2, 3, 5])  # a collision must not return KV
    with pytest.raises(BlockMismatch, match="key"):
        block_format.decode(shape, data, keys.block_key(NS, [0, 0, 0, 0], SALT), parent, tokens)
    with pytest.raises(BlockMismatch, match="format"):
        block_format.decode(shape, data[:4] + b"\x02\x00" + data[6:], key, parent, tokens)
    with pytest.raises(BlockMismatch, match="shape"):
        block_format.decode(BlockShape(torch.float32, 4, 1, 2, 3), data, key, parent, tokens)
    with pytest.raises(BlockMismatch, match="size"):
        block_format.decode(shape, data[:-1], key, parent, tokens)


def test_int8_block_carries_its_scales_and_is_not_read_as_float():
    shape = BlockShape(torch.int8, block_size=4, layers=2, kv_heads=1, head_dim=3)
    k = torch.randint(-127, 128, shape.k_shape, dtype=torch.int8)
    v = torch.randint(-127, 128, shape.v_shape, dtype=torch.int8)
    ks, vs = torch.rand(2, 1, 4), torch.rand(2, 1, 4)
    key, parent, tokens = keys.block_key(NS, [1, 2, 3, 4], SALT), NS, [1, 2, 3, 4]
    data = block_format.encode(shape, key, parent, tokens, k, v, ks, vs)
    assert len(data) == shape.nbytes()
    got = block_format.decode(shape, data, key, parent, tokens)
    assert all(torch.equal(a, b) for a, b in zip(got, (k, v, ks, vs), strict=True))
    with pytest.raises(ValueError, match="declared shape"):  # an int8 block without its scales
        block_format.encode(shape, key, parent, tokens, k, v)
    with pytest.raises(BlockMismatch):  # a float reader never takes int8 pages for its own
        block_format.decode(BlockShape(torch.float32, 4, 2, 1, 3), data, key, parent, tokens)


def test_event_log_replays_or_snapshots():
    log = EventLog(ring_size=3)
    first = log.read(None)
    assert first.snapshot and first.last_seq == 0
    log.record(STORED, LOCAL, [b"a", b"b"])
    log.record(STORED, SHARED, [b"a"])
    batch = log.read(0)
    assert not batch.snapshot and [e.seq for e in batch.events] == [1, 2]
    assert log.read(2).events == []
    log.record(REMOVED, LOCAL, [b"a"])
    log.record(STORED, LOCAL, [b"c"])  # the ring (3) no longer holds event 1
    snap = log.read(0)
    assert snap.snapshot and snap.last_seq == 4
    assert {e.tier: set(e.keys) for e in snap.events} == {LOCAL: {b"b", b"c"}, SHARED: {b"a"}}
    log.record(CLEARED, SHARED)
    assert log.sizes() == (2, 0)
    assert log.read(99).snapshot  # a reader from another life of the log
