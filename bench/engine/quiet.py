"""Is the machine quiet enough to measure? The 1-minute load average, before and during each run.

OpenMP threads slow down sharply when anything else wants the cores, so a figure taken on a busy
machine says little about the system measured. Before each system the harness waits for the load
to settle (it decays over about a minute after the previous system); a run whose load stayed above
what the system itself explains is flagged noisy, or refused with --require-quiet.
"""

from __future__ import annotations

import os
import time

#: load1 below which the machine counts as idle before a run
IDLE = 0.7
#: extra load1 tolerated during a run beyond the system's own threads
MARGIN = 1.0


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def wait_for_quiet(max_wait_s: float, poll_s: float = 5.0) -> tuple[float, bool]:
    """Wait until load1 < IDLE, at most max_wait_s; returns (load1, quiet)."""
    end = time.monotonic() + max_wait_s
    while True:
        now = load1()
        if now < IDLE:
            return now, True
        if time.monotonic() >= end:
            return now, False
        time.sleep(poll_s)


def assess(before: float, during: list[float], threads: int) -> dict:
    """The load_avg record of one system's run and whether it counts as noisy."""
    peak = max(during, default=before)
    noisy = before >= IDLE or peak > threads + MARGIN
    return {"before": before, "during_max": peak, "during": during, "threads": threads, "noisy": noisy}
