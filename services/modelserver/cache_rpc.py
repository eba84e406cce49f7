"""The model server's cache surface: KV events on the load stream, the tokenizer for routers,
cache figures and flushes (meshctl cache). Plain functions over the engines; the servicer only
converts and calls.

An engine takes part when it has a `cache` with an EventLog (`events`), a `namespace`, a
`block_size` and tokenizer files: the torch engine (torch_engine/cache_link.py) and the
TensorRT-LLM engine (trtllm/kv_bridge.py, fed by its KV-cache events).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from meshserve.v1 import modelserver_pb2 as pb

from services.cache import events as ev
from services.cache import metrics, runtime
from services.cache.keys import store_pattern
from services.common.errors import NotFound

from .engine.base import Engine

_KIND = {ev.STORED: pb.KV_EVENT_KIND_STORED, ev.REMOVED: pb.KV_EVENT_KIND_REMOVED,
         ev.CLEARED: pb.KV_EVENT_KIND_CLEARED}
_TIER = {ev.LOCAL: pb.KV_TIER_LOCAL, ev.SHARED: pb.KV_TIER_SHARED}


def cache_of(engine: Engine | None) -> Any | None:
    cache = getattr(engine, "cache", None)
    return cache if isinstance(getattr(cache, "events", None), ev.EventLog) else None


class EventCursor:
    """Where one load stream stands in each model's event log: (epoch, last sequence number)."""

    def __init__(self) -> None:
        self._at: dict[str, tuple[int, int]] = {}

    def collect(self, engines: Mapping[str, Engine]) -> list[pb.KvEvents]:
        out = []
        for model, engine in sorted(engines.items()):
            cache = cache_of(engine)
            if cache is None:
                continue
            log: ev.EventLog = cache.events
            epoch, seq = self._at.get(model, (log.epoch, -1))
            batch = log.read(seq if epoch == log.epoch and seq >= 0 else None)
            self._at[model] = (log.epoch, batch.last_seq)
            if not batch.snapshot and not batch.events:
                continue
            msg = pb.KvEvents(model=model, epoch=log.epoch, snapshot=batch.snapshot,
                              info=pb.KvCacheInfo(namespace=cache.namespace, block_size=cache.block_size,
                                                  tokenizer_digest=cache.tokenizer_digest))
            for e in batch.events:
                msg.events.add(seq=e.seq, kind=_KIND[e.kind], tier=_TIER[e.tier], block_keys=list(e.keys))
            out.append(msg)
        for model in [m for m in self._at if m not in engines]:
            del self._at[model]
        return out


def tokenizer(engine: Engine | None, model: str) -> pb.GetTokenizerResponse:
    cache = cache_of(engine)
    if cache is None:
        raise NotFound(f"model {model!r} is not loaded here with a tokenizer routers can use")
    return pb.GetTokenizerResponse(digest=cache.tokenizer_digest, files=cache.tokenizer_files)


def stats(server_id: str, engines: Mapping[str, Engine]) -> pb.GetCacheStatsResponse:
    store = runtime.store()
    out = pb.GetCacheStatsResponse(server_id=server_id, store=store.url if store is not None else "")
    if store is not None:
        info = store.info()
        out.store_up = bool(info)
        out.store_used_bytes = info.get("used_bytes", 0)
        out.store_max_bytes = info.get("max_bytes", 0)
        out.store_keys = info.get("keys", 0)
        out.store_evicted_keys = info.get("evicted_keys", 0)
    for model in sorted(engines):
        cache = cache_of(engines[model])
        if cache is not None:
            metrics.tier_stats(model, "local").blocks = cache.events.sizes()[0]
        tiers = [pb.CacheTierStats(tier=s.tier, hits=s.hits, misses=s.misses, bytes_read=s.bytes_read,
                                   bytes_written=s.bytes_written, evictions=s.evictions, errors=s.errors,
                                   blocks=s.blocks) for s in metrics.model_stats(model)]
        out.models.add(model=model, tiers=tiers)
    return out


async def flush(engines: Mapping[str, Engine], model: str, tenant: str, shared: bool) -> pb.FlushCacheResponse:
    """Drop local cached blocks (between steps) and, with `shared`, the store's entries of the
    models (and tenant) named."""
    if model and model not in engines:
        raise NotFound(f"model {model!r} is not loaded on this server")
    out = pb.FlushCacheResponse()
    store = runtime.store()
    salt = runtime.salt(tenant) if tenant else None
    for name in ([model] if model else sorted(engines)):
        engine = engines[name]
        cache = cache_of(engine)
        if cache is None:
            continue
        if hasattr(engine, "on_core_thread") and hasattr(cache, "flush_local") and not tenant:
            out.local_blocks += await engine.on_core_thread(cache.flush_local)
        if shared and store is not None:
            for kind in ("kv1", "resp1"):
                out.shared_keys += await asyncio.to_thread(store.delete_matching,
                                                           store_pattern(kind, cache.namespace, salt))
            tier = getattr(cache, "tier", None)
            if tier is not None:
                tier.forget_known()
            else:
                cache.events.record(ev.CLEARED, ev.SHARED)
    return out
