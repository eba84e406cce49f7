"""Admission by priority when every candidate is saturated.

CRITICAL goes ahead (the engines order their own queues by priority too). SHEDDABLE is refused
at once with RESOURCE_EXHAUSTED and a retry hint. STANDARD waits here, first in first out, in a
bounded queue until some candidate has room or its deadline passes. Waiting in the router rather
than at a server keeps the choice of server open until the moment one has room.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable


class QueueFull(Exception):
    pass


class QueueTimeout(Exception):
    pass


class AdmissionQueue:
    """FIFO waiters; only the head may be admitted, and only when `has_room()` says so."""

    #: Re-check at least this often: load reports and finished requests also wake the head.
    POLL_S = 0.05

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("queue limit must be >= 0")
        self.limit = limit
        self._waiters: deque[asyncio.Event] = deque()

    def __len__(self) -> int:
        return len(self._waiters)

    def notify(self) -> None:
        """Something changed (a request ended, a load report arrived): let the head re-check."""
        if self._waiters:
            self._waiters[0].set()

    async def wait(self, has_room: Callable[[], bool], timeout: float | None) -> float:
        """Returns the seconds waited; raises QueueFull or QueueTimeout."""
        if len(self._waiters) >= self.limit:
            raise QueueFull(f"the router's queue is full ({self.limit} waiting)")
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        me = asyncio.Event()
        self._waiters.append(me)
        try:
            while True:
                if self._waiters[0] is me and has_room():
                    return time.monotonic() - started
                left = self.POLL_S if deadline is None else min(self.POLL_S,
                                                                 deadline - time.monotonic())
                if left <= 0:
                    raise QueueTimeout(f"waited {time.monotonic() - started:.1f}s for a server "
                                       "with room")
                me.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(me.wait(), left)
        finally:
            self._waiters.remove(me)
            self.notify()
