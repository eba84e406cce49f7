"""A retry budget, so that retries cannot turn a partial outage into a full one.

Retries (and migrations) over a sliding window may be at most `ratio` of the requests in that
window plus a small floor (so a quiet router can still retry). When every server fails, retries
stop at the budget instead of multiplying the load on whatever is left.

One server dying is not a storm: every stream on it fails at once (26 long streams on one killed
server used to exhaust the budget). Failures that carry the same key - the dying server's id,
given when its connection was lost or the router abandoned it (hung, left, NOT_SERVING) - spend
the budget once per `episode_s`; the rest of that episode's failovers are free. Failures that
servers answer while alive (UNAVAILABLE, RESOURCE_EXHAUSTED ...) carry no key and each spends.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class RetryBudget:
    def __init__(self, ratio: float = 0.2, floor: int = 10, window_s: float = 10.0, episode_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ratio < 0 or floor < 0 or window_s <= 0 or episode_s < 0:
            raise ValueError("ratio, floor and episode_s must be >= 0 and window_s > 0")
        self.ratio = ratio
        self.floor = floor
        self.window_s = window_s
        self.episode_s = episode_s
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self._episodes: dict[str, float] = {}  # key -> when its episode started
        self.correlated = 0  # failovers that rode on an episode already paid for

    def _trim(self, now: float) -> None:
        edge = now - self.window_s
        for q in (self._requests, self._retries):
            while q and q[0] < edge:
                q.popleft()
        if len(self._episodes) > 64:
            self._episodes = {k: t for k, t in self._episodes.items() if now - t < self.episode_s}

    def request(self) -> None:
        """Count one incoming request."""
        now = self._clock()
        self._requests.append(now)
        if len(self._requests) > 4096:  # keep the deque short on busy routers
            self._trim(now)

    def try_spend(self, key: str | None = None) -> bool:
        """True (and counted) if one more retry fits the budget now."""
        now = self._clock()
        if key is not None:
            started = self._episodes.get(key)
            if started is not None and now - started < self.episode_s:
                self.correlated += 1
                return True
        self._trim(now)
        if len(self._retries) >= self.floor + self.ratio * len(self._requests):
            return False
        self._retries.append(now)
        if key is not None:
            self._episodes[key] = now
        return True
