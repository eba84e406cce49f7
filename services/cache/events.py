"""A model's KV events: what its engine holds, per tier, as numbered changes a reader can follow.

Events are kept in a bounded ring for replay; the current sets are kept for snapshots. A reader
asks for everything after the last sequence number it saw: it gets the missing events if the ring
still has them, else (a new reader, a restarted router, one that fell too far behind) a snapshot
that replaces what it knew. The epoch changes when the log is recreated (the engine restarted),
so a reader never splices two lives of one engine. Thread-safe: the engine's step thread records,
the server's load streams read.
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass

LOCAL, SHARED = "local", "shared"
STORED, REMOVED, CLEARED = "stored", "removed", "cleared"


@dataclass(frozen=True)
class Event:
    seq: int
    kind: str  # stored | removed | cleared
    tier: str  # local | shared
    keys: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class Batch:
    snapshot: bool
    events: list[Event]
    last_seq: int


class EventLog:
    def __init__(self, ring_size: int = 65_536, shared_capacity: int = 65_536) -> None:
        self.epoch = time.time_ns() & ((1 << 63) - 1)
        self._lock = threading.Lock()
        self._ring: collections.deque[Event] = collections.deque(maxlen=ring_size)
        self._seq = 0
        self._local: set[bytes] = set()
        #: What this server knows to be in the shared store (it wrote or fetched it), bounded.
        self._shared: collections.OrderedDict[bytes, None] = collections.OrderedDict()
        self._shared_capacity = shared_capacity

    @property
    def seq(self) -> int:
        return self._seq

    def record(self, kind: str, tier: str, keys: list[bytes] | tuple[bytes, ...] = ()) -> None:
        with self._lock:
            members = self._local if tier == LOCAL else None
            if kind == STORED:
                if members is not None:
                    members.update(keys)
                else:
                    self._remember_shared(keys)
            elif kind == REMOVED:
                for k in keys:
                    (members.discard(k) if members is not None else self._shared.pop(k, None))
            else:
                (members.clear() if members is not None else self._shared.clear())
            self._seq += 1
            self._ring.append(Event(self._seq, kind, tier, tuple(keys)))

    def _remember_shared(self, keys: list[bytes] | tuple[bytes, ...]) -> None:
        for k in keys:
            self._shared[k] = None
            self._shared.move_to_end(k)
        while len(self._shared) > self._shared_capacity:
            self._shared.popitem(last=False)

    def read(self, after: int | None) -> Batch:
        """Events after sequence number `after`, or a snapshot when they are not all in the ring."""
        with self._lock:
            if after == self._seq:
                return Batch(False, [], self._seq)
            if after is not None and after < self._seq and self._ring and self._ring[0].seq <= after + 1:
                return Batch(False, [e for e in self._ring if e.seq > after], self._seq)
            snap = [Event(self._seq, STORED, LOCAL, tuple(self._local)),
                    Event(self._seq, STORED, SHARED, tuple(self._shared))]
            return Batch(True, snap, self._seq)

    def sizes(self) -> tuple[int, int]:
        with self._lock:
            return len(self._local), len(self._shared)
