"""Stage 3a: session affinity by rendezvous (highest-random-weight) hashing with a load bound.

Every router replica ranks servers for a session with the same stable hash of (session, server),
so replicas agree without talking to each other, and a server that leaves moves only the sessions
it ranked first. The first-ranked server is skipped when it is saturated or above the bound
(`affinity_load_bound` x the tier's average load, as in consistent hashing with bounded loads):
affinity never overrides saturation, it only decides among servers that can take the work.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import TypeVar

from .types import Endpoint, Settings

E = TypeVar("E", bound=Endpoint)


def weight(session: str, server_id: str) -> int:
    """Stable across processes and restarts (Python's hash() is salted per process)."""
    digest = hashlib.blake2b(f"{session}\x00{server_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranked(tier: Sequence[E], session: str) -> list[E]:
    return sorted(tier, key=lambda e: (weight(session, e.server_id), e.server_id), reverse=True)


def capacity(tier: Sequence[Endpoint], bound: float) -> int:
    """Most requests one server may hold, this one included, and still take a session.

    The average counts one extra request per server so that tiny loads (1 in flight against 0)
    do not bounce sessions: a batching engine runs a second sequence almost for free, while a
    move costs the whole prompt's prefill. At real loads this converges to bound x average.
    """
    n = max(1, len(tier))
    total = sum(e.load().in_flight for e in tier)
    return max(1, math.ceil(bound * (total + n) / n))


def choose(tier: Sequence[E], session: str, settings: Settings) -> E | None:
    """The session's server, or None when every ranked server is saturated or over the bound."""
    if not tier or not session:
        return None
    cap = capacity(tier, settings.affinity_load_bound)
    for e in ranked(tier, session):
        load = e.load()
        if load.utilization >= settings.spill_utilization:
            continue
        if load.in_flight + 1 > cap:
            continue
        return e
    return None
