"""Time-stamped samples of one signal and their average over a trailing window (KPA's stable
and panic windows). A sample is one tick's measurement; the average weights ticks equally."""

from __future__ import annotations

from collections import deque


class Window:
    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._samples: deque[tuple[float, float]] = deque()

    def add(self, now: float, value: float) -> None:
        self._samples.append((now, value))
        self._trim(now)

    def _trim(self, now: float) -> None:
        while self._samples and now - self._samples[0][0] > self.span_s:
            self._samples.popleft()

    def average(self, now: float, span_s: float | None = None) -> float:
        """Mean of the samples in the last `span_s` (default: the whole span); 0 when none."""
        span = self.span_s if span_s is None else span_s
        total, n = 0.0, 0
        for t, v in reversed(self._samples):
            if now - t > span:
                break
            total += v
            n += 1
        return total / n if n else 0.0

    def __len__(self) -> int:
        return len(self._samples)

    def resize(self, span_s: float) -> None:
        self.span_s = span_s
