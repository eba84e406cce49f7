"""Choosing a server for one request. Plain Python: no gRPC, no etcd.

Today: least outstanding requests among healthy candidates, random among ties, skipping servers
already tried for this request and servers ejected for repeated failures (unless nothing else is
left). The router issue replaces this with a pipeline (locality, affinity, prefix, load).
"""

from __future__ import annotations

import random
import time
from typing import Protocol, Sequence


class Candidate(Protocol):
    server_id: str
    outstanding: int

    def ejected(self, now: float) -> bool: ...


def pick(candidates: Sequence[Candidate], exclude: set[str] = frozenset(),
         rng: random.Random | None = None) -> Candidate | None:
    rng = rng or random
    now = time.monotonic()
    fresh = [c for c in candidates if c.server_id not in exclude]
    usable = [c for c in fresh if not c.ejected(now)] or fresh
    if not usable:
        return None
    least = min(c.outstanding for c in usable)
    return rng.choice([c for c in usable if c.outstanding == least])
