"""When a worker may take the next job for a model: only while the model's replicas have room.

Room is read from the same replica loads the routers use (the model servers' load reports plus
what this process sent since): a replica offers `floor(max_running * fill) - in_flight` slots to
background work, so background never fills a replica past `fill` of its running capacity and
interactive requests always find free slots. A replica where requests wait for admission offers
nothing either: its engine is already behind, and a new background prompt would only compete with
the waiting ones for the next steps. Ejected or hung replicas offer nothing.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

from services.router.replica import Replica

#: A replica that has not reported yet (max_running unknown) offers this many slots.
UNKNOWN_CAPACITY_SLOTS = 1


def free_slots(replicas: Sequence[Replica], fill: float, now: float | None = None) -> int:
    now = time.monotonic() if now is None else now
    total = 0
    for replica in replicas:
        if replica.ejected(now):
            continue
        load = replica.load()
        if load.queue_depth > 0:
            continue
        if load.max_running <= 0:
            total += max(0, UNKNOWN_CAPACITY_SLOTS - load.in_flight)
            continue
        total += max(0, math.floor(load.max_running * fill) - load.in_flight)
    return total
