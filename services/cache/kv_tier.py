"""The torch engine's link to the shared KV-block tier.

Writes: full blocks the engine computed are offered from the step loop, which only pins them (one
extra reference, so the pool cannot reuse them) and queues them; a writer thread copies each out
of the pool, unpins it at once (the step loop drains the unpinned ids), encodes and writes a batch
in one round trip. At most `max_pending` blocks are pinned: past that, or while the store is down,
offers are dropped (counted), so a slow store never starves the pool.

Reads: before a request enters the engine, the blocks after its local prefix hit are fetched in one
round trip and checked (block_format.decode: version, shape, key, parent key, token ids); the
leading run that verifies is installed into the pool at admission instead of being computed.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from . import block_format, events, metrics
from .block_format import BlockMismatch, BlockShape
from .keys import store_key
from .store import Store

log = logging.getLogger(__name__)

KIND = "kv1"  # the store's key prefix, versioned with the block format
WRITER_NICE = 10


@dataclass(frozen=True)
class BlockRef:
    """One full block of a sequence: its key, its parent's key, salt, tokens and pool block."""

    key: bytes
    parent: bytes
    salt: bytes
    tokens: tuple[int, ...]
    block: int = -1


class KvTier:
    def __init__(self, store: Store, model: str, namespace: bytes, shape: BlockShape, pools: Sequence[torch.Tensor],
                 log_: events.EventLog | None = None, max_pending: int = 32, known_capacity: int = 65_536) -> None:
        """`pools`: the engine's pool tensors indexed [layer, block, ...] (K, V[, their int8 scales])."""
        self.store, self.namespace, self.shape = store, namespace, shape
        self._pools = list(pools)
        self.events = log_
        self.max_pending = max_pending
        self.stats = metrics.tier_stats(model, "shared")
        self.released: collections.deque[int] = collections.deque()
        #: Called on the writer thread when blocks land in `released` (the engine wakes its loop).
        self.on_released: Callable[[], None] | None = None
        self._pending = 0
        self._queue: queue.Queue[list[BlockRef] | None] = queue.Queue()
        self._known: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._known_capacity = known_capacity
        self._known_lock = threading.Lock()
        #: CPU seconds the tier spent per path (offer: step thread; write: writer; read: fetches),
        #: so its cost can be told from the machine's load (bench/cache/miss.py).
        self.cpu_s = {"offer": 0.0, "write": 0.0, "read": 0.0}
        self._thread = threading.Thread(target=self._write_loop, name=f"kv-tier-{model}", daemon=True)
        self._thread.start()
        self._stop = threading.Event()
        threading.Thread(target=store.watch_evictions, args=(self._on_evicted, self._stop),
                         name=f"kv-tier-evictions-{model}", daemon=True).start()

    def name(self, ref: BlockRef) -> str:
        return store_key(KIND, self.namespace, ref.salt, ref.key)

    def _remember(self, keys: Sequence[bytes]) -> None:
        with self._known_lock:
            for k in keys:
                self._known[k] = None
                self._known.move_to_end(k)
            while len(self._known) > self._known_capacity:
                self._known.popitem(last=False)

    def _on_evicted(self, names: list[str]) -> None:
        """The store evicted entries: those of this tier's blocks that it knew go out as `removed`
        (shared), so routers stop crediting them."""
        prefix = f"ms:{KIND}:{self.namespace[:8].hex()}:"
        gone = []
        with self._known_lock:
            for name in names:
                if name.startswith(prefix):
                    with contextlib.suppress(ValueError):
                        key = bytes.fromhex(name.rpartition(":")[2])
                        if self._known.pop(key, False) is None:  # present (its value is None)
                            gone.append(key)
        if gone and self.events is not None:
            self.events.record(events.REMOVED, events.SHARED, gone)

    def known(self, key: bytes) -> bool:
        with self._known_lock:
            return key in self._known

    # ---- writes (offer on the step thread, the rest on the writer thread) -----------------------
    @contextlib.contextmanager
    def _cpu(self, path: str) -> Iterator[None]:
        t0 = time.thread_time()
        try:
            yield
        finally:
            with self._known_lock:
                self.cpu_s[path] += time.thread_time() - t0

    def offer(self, refs: list[BlockRef]) -> list[BlockRef]:
        """The refs accepted for writing; the caller pins their blocks until `released` has them."""
        with self._cpu("offer"):
            return self._offer(refs)

    def _offer(self, refs: list[BlockRef]) -> list[BlockRef]:
        fresh = [r for r in refs if not self.known(r.key)]
        if not fresh:
            return []
        room = self.max_pending - self._pending
        if not self.store.available() or room <= 0:
            self.stats.error("write_dropped", len(fresh))
            return []
        if len(fresh) > room:
            self.stats.error("write_dropped", len(fresh) - room)
            fresh = fresh[:room]
        self._pending += len(fresh)  # only the step thread adds; the writer lowers it via released
        self._queue.put(fresh)
        return fresh

    def drain_released(self) -> list[int]:
        out = []
        while self.released:
            out.append(self.released.popleft())
        self._pending -= len(out)
        return out

    def _write_loop(self) -> None:
        with contextlib.suppress(OSError):  # Linux: nice this thread alone, so writes yield to the step loop
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICE)
        torch.set_num_threads(1)
        while True:
            refs = self._queue.get()
            if refs is None:
                return
            try:
                with self._cpu("write"):
                    self._write(refs)
            finally:
                self._queue.task_done()

    def _write(self, refs: list[BlockRef]) -> None:
        items, written = self._encode(refs)
        if self.on_released is not None:
            self.on_released()
        if not items:
            return
        if self.store.set_many(items):
            self._remember([r.key for r in written])
            self.stats.wrote(sum(len(v) for v in items.values()))
            if self.events is not None:
                self.events.record(events.STORED, events.SHARED, [r.key for r in written])
        else:
            self.stats.error("store_full" if self.store.up else "store_down", len(written))

    def wait_writes(self, timeout_s: float) -> bool:
        """Block until every offered batch is written or dropped (benchmarks settle on it); False
        on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._queue.all_tasks_done.wait(left)
        return True

    def _encode(self, refs: list[BlockRef]) -> tuple[dict[str, bytes | bytearray], list[BlockRef]]:
        """The store's entries for `refs` and the refs they hold; every block is released exactly
        once, encoded or not."""
        items: dict[str, bytes | bytearray] = {}
        written: list[BlockRef] = []
        for r in refs:
            try:  # one copy, from the pinned page straight into the value
                items[self.name(r)] = block_format.encode(self.shape, r.key, r.parent, r.tokens,
                                                          *(p[:, r.block] for p in self._pools))
                written.append(r)
            except Exception:
                log.exception("could not encode KV block %s for the shared tier", r.key.hex()[:16])
            finally:
                self.released.append(r.block)  # copied (or failed): the pool may reuse it now
        return items, written

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)

    # ---- reads (any thread but the step thread) -------------------------------------------------
    def fetch(self, refs: Sequence[BlockRef]) -> list[tuple[torch.Tensor, ...]]:
        """K/V of the leading run of `refs` found in the store and verified."""
        with self._cpu("read"):
            return self._fetch(refs)

    def _fetch(self, refs: Sequence[BlockRef]) -> list[tuple[torch.Tensor, ...]]:
        if not refs or not self.store.available():
            if refs:
                self.stats.error("store_down")
            return []
        values = self.store.get_many([self.name(r) for r in refs])
        out: list[tuple[torch.Tensor, ...]] = []
        nbytes = 0
        for ref, data in zip(refs, values, strict=True):
            if data is None:
                break
            try:
                out.append(block_format.decode(self.shape, data, ref.key, ref.parent, ref.tokens))
            except BlockMismatch as e:
                log.warning("shared KV block %s rejected: %s", ref.key.hex()[:16], e)
                self.stats.error("verify_failed")
                break
            nbytes += len(data)
        if out:
            self.stats.hit(len(out), nbytes)
            self._remember([r.key for r in refs[:len(out)]])
        self.stats.miss(len(refs) - len(out))
        if len(out) < len(refs) and values[len(out)] is None and self.known(refs[len(out)].key):
            gone = refs[len(out)].key  # evicted by the store (LRU) or flushed: write it again next time
            with self._known_lock:
                self._known.pop(gone, None)
            if self.events is not None:
                self.events.record(events.REMOVED, events.SHARED, [gone])
        return out

    def forget_known(self) -> None:
        """The store was flushed: nothing this tier wrote or read is known to be there any more."""
        with self._known_lock:
            self._known.clear()
        if self.events is not None:
            self.events.record(events.CLEARED, events.SHARED)
