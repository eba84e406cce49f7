"""KV-cache events: which prefix blocks this replica holds, as they are stored and evicted.

TensorRT-LLM publishes them through `LLM.get_kv_cache_events_async` (with
`KvCacheConfig.event_buffer_max_size` > 0): "stored" (blocks with their hashes, parent hash and
token ids), "removed" (block hashes), "created" (the cache was (re)built) and "updated" (priority or
tier changes, not needed for routing). `parse_events` turns them into `KvEvent`s and `KvEventFeed`
fans them out to any number of readers.

The interface the shared-cache issue will feed to routers (the same shape the torch engine's
events should take): `engine.kv_events()` is an async iterator of `KvEvent`, each with a
sequence number. A reader that falls behind by more than its queue gets one `reset` event (its
backlog is dropped): it must forget what it knows about this replica and rebuild from later
`stored` events, so a slow reader never blocks the engine and never holds a silently wrong index.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

log = logging.getLogger(__name__)

EventKind = Literal["stored", "removed", "reset"]


@dataclass(frozen=True)
class KvEvent:
    """One change to the replica's cached blocks. `seq` increases by one per event of a feed, so a
    gap tells a reader it missed something."""

    seq: int
    kind: EventKind
    block_hashes: tuple[int, ...] = ()
    #: "stored" only: the hash of the block before the first one (None at the sequence start),
    #: and the token ids of each stored block.
    parent_hash: int | None = None
    block_tokens: tuple[tuple[int, ...], ...] = ()


def _token_ids(block: Mapping[str, Any]) -> tuple[int, ...]:
    tokens = block.get("tokens") or block.get("token_ids") or ()
    out = []
    for t in tokens:
        tid = t.get("token_id") if isinstance(t, Mapping) else t
        if isinstance(tid, int):
            out.append(tid)
    return tuple(out)


def _one(raw: Mapping[str, Any]) -> tuple[EventKind, tuple[int, ...], int | None, tuple[tuple[int, ...], ...]] | None:
    data = raw.get("data", raw)
    if not isinstance(data, Mapping):
        return None
    kind = data.get("type")
    if kind == "stored":
        blocks = [b for b in data.get("blocks") or ()
                  if isinstance(b, Mapping) and isinstance(b.get("block_hash"), int)]
        parent = data.get("parent_hash")
        return ("stored", tuple(b["block_hash"] for b in blocks), parent if isinstance(parent, int) else None,
                tuple(_token_ids(b) for b in blocks))
    if kind == "removed":
        return "removed", tuple(h for h in data.get("block_hashes") or () if isinstance(h, int)), None, ()
    if kind == "created":
        return "reset", (), None, ()
    return None  # "updated" and anything newer: not needed to know which prefixes are held


def parse_events(raw: Any) -> list[tuple[EventKind, tuple[int, ...], int | None, tuple[tuple[int, ...], ...]]]:
    """TensorRT-LLM's event item (a dict, a list of them, or their JSON) as (kind, hashes, parent,
    tokens) tuples; anything unreadable is skipped."""
    if isinstance(raw, str | bytes):
        try:
            raw = json.loads(raw)
        except ValueError:
            return []
    items: Iterable[Any] = raw if isinstance(raw, list) else [raw]
    out = []
    for item in items:
        parsed = _one(item) if isinstance(item, Mapping) else None
        if parsed is not None:
            out.append(parsed)
    return out


class KvEventFeed:
    """Numbers events and hands each to every subscriber's bounded queue."""

    def __init__(self, queue_size: int = 4096) -> None:
        self.queue_size = queue_size
        self._seq = 0
        self._subscribers: set[asyncio.Queue[KvEvent]] = set()

    def publish_raw(self, raw: Any) -> int:
        n = 0
        for kind, hashes, parent, tokens in parse_events(raw):
            self.publish(kind, hashes, parent, tokens)
            n += 1
        return n

    def publish(self, kind: EventKind, hashes: tuple[int, ...] = (), parent: int | None = None,
                tokens: tuple[tuple[int, ...], ...] = ()) -> None:
        self._seq += 1
        event = KvEvent(self._seq, kind, hashes, parent, tokens)
        for q in self._subscribers:
            if q.full():  # a slow reader: drop its backlog, tell it to rebuild
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(KvEvent(self._seq, "reset"))
            else:
                q.put_nowait(event)

    def subscribe(self) -> Subscription:
        """A reader that receives every event published from now on (registered at once, so
        nothing between this call and the first read is missed)."""
        q: asyncio.Queue[KvEvent] = asyncio.Queue(self.queue_size)
        self._subscribers.add(q)
        return Subscription(q, self._subscribers)


class Subscription(AsyncIterator[KvEvent]):
    """One reader's events; `aclose()` (or leaving `async with`) unsubscribes."""

    def __init__(self, queue: asyncio.Queue[KvEvent], registry: set[asyncio.Queue[KvEvent]]) -> None:
        self._queue, self._registry = queue, registry

    async def __anext__(self) -> KvEvent:
        if self._queue not in self._registry:
            raise StopAsyncIteration
        return await self._queue.get()

    async def aclose(self) -> None:
        self._registry.discard(self._queue)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


async def poll_events(source: Any, feed: KvEventFeed, idle_s: float = 0.2) -> None:
    """Read KV-cache events for ever (`source()` returns one get_kv_cache_events_async iterator,
    which ends after its timeout without events). On an error the feed says `reset`: events may
    have been lost."""
    backoff = idle_s
    while True:
        try:
            async for raw in source():
                feed.publish_raw(raw)
            backoff = idle_s
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - events are best effort; readers are told to rebuild
            if backoff == idle_s:
                log.warning("tensorrt_llm KV-cache events unavailable (%s); readers reset", e)
            feed.publish("reset")
            backoff = min(backoff * 2, 5.0)
        await asyncio.sleep(backoff)
