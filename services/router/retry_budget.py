"""A retry budget, so that retries cannot turn a partial outage into a full one.

Retries (and migrations) over a sliding window may be at most `ratio` of the requests in that
window plus a small floor (so a quiet router can still retry). When a server dies every request
on it retries once -- fine; when every server fails, retries stop at the budget instead of
multiplying the load on whatever is left.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RetryBudget:
    def __init__(self, ratio: float = 0.2, floor: int = 10, window_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ratio < 0 or floor < 0 or window_s <= 0:
            raise ValueError("ratio and floor must be >= 0 and window_s > 0")
        self.ratio = ratio
        self.floor = floor
        self.window_s = window_s
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def _trim(self, now: float) -> None:
        edge = now - self.window_s
        for q in (self._requests, self._retries):
            while q and q[0] < edge:
                q.popleft()

    def request(self) -> None:
        """Count one incoming request."""
        now = self._clock()
        self._requests.append(now)
        if len(self._requests) > 4096:  # keep the deque short on busy routers
            self._trim(now)

    def try_spend(self) -> bool:
        """True (and counted) if one more retry fits the budget now."""
        now = self._clock()
        self._trim(now)
        if len(self._retries) >= self.floor + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        return True
