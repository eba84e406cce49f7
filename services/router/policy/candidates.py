"""Stage 1: which endpoints may take this attempt at all.

Membership already narrowed the list to replicas of the model READY on servers with verdict
SERVING and no drain (pool.BackendPool.candidates). Here: drop servers this request already
tried, and replicas ejected (repeated failures, or a server gone silent) -- unless nothing else
is left, because a possibly-bad replica beats a certain error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TypeVar

from .types import Endpoint

E = TypeVar("E", bound=Endpoint)


def usable(endpoints: Sequence[E], exclude: set[str] | frozenset[str] = frozenset(),
           now: float | None = None) -> list[E]:
    now = time.monotonic() if now is None else now
    fresh = [e for e in endpoints if e.server_id not in exclude]
    return [e for e in fresh if not e.ejected(now)] or fresh
