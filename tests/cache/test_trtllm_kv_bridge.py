"""TensorRT-LLM's KV-cache events become canonical keys on the same event log as the torch
engine's, so routers index both kinds of replica alike."""

from __future__ import annotations

from services.cache import keys, runtime
from services.cache.events import LOCAL
from services.modelserver.trtllm.kv_bridge import TrtKvCache
from services.modelserver.trtllm.kv_events import KvEvent


def test_stored_chains_removed_and_reset_follow_tensorrt_llm():
    cache = TrtKvCache("/models/m", block_size=2)
    salt = runtime.salt("")
    k1 = keys.block_key(cache.namespace, [1, 2], salt)
    k2 = keys.block_key(k1, [3, 4], salt)
    cache.apply(KvEvent(1, "stored", (101, 102, 103), None, ((1, 2), (3, 4), (5,))))  # partial block dropped
    cache.apply(KvEvent(2, "stored", (201,), 999, ((7, 8),)))  # parent never seen: unkeyable, skipped
    snap = cache.events.read(None)
    assert {e.tier: set(e.keys) for e in snap.events}[LOCAL] == {k1, k2}
    k3 = keys.block_key(k2, [9, 9], salt)
    cache.apply(KvEvent(3, "stored", (104,), 102, ((9, 9),)))  # continues a known chain
    cache.apply(KvEvent(4, "removed", (101, 555)))
    assert cache.events.sizes() == (2, 0)
    assert {k for e in cache.events.read(None).events for k in e.keys} == {k2, k3}
    cache.apply(KvEvent(5, "reset"))
    assert cache.events.sizes() == (0, 0)
    assert cache.tokenizer_digest == "" and cache.block_size == 2
