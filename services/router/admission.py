"""Admission by priority when every candidate is saturated.

CRITICAL goes ahead (the engines order their own queues by priority too). SHEDDABLE is refused
at once with RESOURCE_EXHAUSTED and a retry hint. STANDARD waits here, first in first out, in a
bounded queue until some candidate has room or its deadline passes. Waiting in the router rather
than at a server keeps the choice of server open until the moment one has room.

A model scaled to zero has no replica at all: its requests (every priority) wait in a second
bounded queue per model, with their deadlines, until the control plane has placed one
(`wait_for_replica`); the leader sees them waiting through RouterLoadService and places at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable, Sequence

from services.common.errors import DeadlineExceeded, ResourceExhausted, Unavailable
from services.common.validation import Priority

from . import metrics
from .policy.types import Endpoint


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
            raise QueueFull(f"the router's queue for it is full ({self.limit} waiting)")
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


class Admission:
    """Decides, per request, between going ahead, waiting in its model's queue and being shed.

    `candidates(model)` gives the model's replicas; a replica is saturated at `shed_utilization`
    of its running capacity. Each model is judged alone and queues alone (a FIFO of at most
    `queue_size` per model): a busy model never sheds or delays another on the same servers.
    """

    def __init__(self, candidates: Callable[[str], Sequence[Endpoint]], shed_utilization: float,
                 queue_size: int, queue_timeout_s: float, retry_after_ms: int) -> None:
        self._candidates = candidates
        self.shed_utilization = shed_utilization
        self.queue_size = queue_size
        self._queues: dict[str, AdmissionQueue] = {}
        self._activation: dict[str, AdmissionQueue] = {}  # models waiting for a first replica
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_ms = retry_after_ms

    def notify(self) -> None:
        """Load changed or a request ended: the head of every model's queue re-checks."""
        for queue in self._queues.values():
            queue.notify()
        for queue in self._activation.values():
            queue.notify()

    def waiting(self, model: str) -> int:
        queue = self._queues.get(model)
        return len(queue) if queue is not None else 0

    def waiting_for_replica(self, model: str) -> int:
        queue = self._activation.get(model)
        return len(queue) if queue is not None else 0

    async def wait_for_replica(self, model: str, deadline: float | None, timeout_s: float) -> float:
        """Seconds waited until the model has a replica (it was scaled to zero). Raises
        Unavailable when the queue is full, DeadlineExceeded / Unavailable when it ran out."""
        wait = timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
        queue = self._activation.get(model)
        if queue is None:
            queue = self._activation[model] = AdmissionQueue(self.queue_size)
        hint = self.retry_after_ms
        metrics.child(metrics.WAITING_FOR_REPLICA, model).inc()
        try:
            waited = await queue.wait(lambda: bool(self._candidates(model)), wait)
        except QueueFull as exc:
            metrics.SHED.labels(model, "ANY", "activation_queue_full").inc()
            raise Unavailable(f"model {model!r} is scaled to zero and {exc}; retry after {hint} ms",
                              retry_after_ms=hint) from None
        except QueueTimeout as exc:
            metrics.SHED.labels(model, "ANY", "activation_timeout").inc()
            text = f"model {model!r} is scaled to zero and no replica became ready in time ({exc})"
            if deadline is not None:
                raise DeadlineExceeded(text) from None
            raise Unavailable(f"{text}; retry after {hint} ms", retry_after_ms=hint) from None
        finally:
            metrics.child(metrics.WAITING_FOR_REPLICA, model).dec()
        metrics.child(metrics.ACTIVATION_WAIT, model).observe(waited)
        return waited

    def saturated(self, model: str) -> bool:
        replicas = self._candidates(model)
        return bool(replicas) and all(r.load().utilization >= self.shed_utilization for r in replicas)

    async def admit(self, model: str, priority: Priority, deadline: float | None) -> float:
        """Seconds spent queued. CRITICAL passes; SHEDDABLE is shed; STANDARD queues."""
        if priority == Priority.CRITICAL or (not self.waiting(model) and not self.saturated(model)):
            return 0.0
        label, hint = priority.name, self.retry_after_ms
        if priority == Priority.SHEDDABLE:
            metrics.SHED.labels(model, label, "saturated").inc()
            raise ResourceExhausted(f"every replica of model {model!r} is saturated and the request is "
                                    f"SHEDDABLE; retry after {hint} ms", retry_after_ms=hint)
        wait = self.queue_timeout_s if deadline is None else max(0.0, deadline - time.monotonic())
        queue = self._queues.get(model)
        if queue is None:
            queue = self._queues[model] = AdmissionQueue(self.queue_size)
        depth = metrics.child(metrics.QUEUED, model)
        depth.inc()
        try:
            waited = await queue.wait(lambda: not self.saturated(model), wait)
        except QueueFull as exc:
            metrics.SHED.labels(model, label, "queue_full").inc()
            raise Unavailable(f"every replica of model {model!r} is saturated and {exc}; retry after "
                              f"{hint} ms", retry_after_ms=hint) from None
        except QueueTimeout as exc:
            metrics.SHED.labels(model, label, "queue_timeout").inc()
            if deadline is not None:
                raise DeadlineExceeded(f"deadline passed while queued: every replica of model {model!r} "
                                       f"stayed saturated ({exc})") from None
            raise Unavailable(f"every replica of model {model!r} stayed saturated ({exc}); retry after "
                              f"{hint} ms", retry_after_ms=hint) from None
        finally:
            depth.dec()
        metrics.QUEUE_WAIT.labels(model).observe(waited)
        return waited
