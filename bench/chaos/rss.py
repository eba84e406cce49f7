"""Resident memory of processes, from /proc: the figure that shows unbounded buffering."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path


def rss_mb(pid: int) -> float:
    """VmRSS of a live process in MB (NaN when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return float("nan")


def snapshot(pids: dict[str, int]) -> dict[str, float]:
    return {name: rss_mb(pid) for name, pid in pids.items()}


class RssSampler:
    """Samples named processes every `interval_s` while running: a time series per process, so
    a caller can tell growth that levels off (bounded buffers filling) from growth that goes on."""

    def __init__(self, pids: dict[str, int], interval_s: float = 0.5, max_samples: int = 2000) -> None:
        self.pids, self.interval_s, self.max_samples = pids, interval_s, max_samples
        self.series: dict[str, list[tuple[float, float]]] = {name: [] for name in pids}
        self._task: asyncio.Task | None = None

    def _sample(self) -> None:
        now = time.monotonic()
        for name, mb in snapshot(self.pids).items():
            if mb == mb and len(self.series[name]) < self.max_samples:  # not NaN, bounded
                self.series[name].append((now, mb))

    async def _run(self) -> None:
        while True:
            self._sample()
            await asyncio.sleep(self.interval_s)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._sample()

    def peak(self, name: str, start: float = 0.0, end: float = float("inf")) -> float | None:
        values = [mb for t, mb in self.series[name] if start <= t < end]
        return max(values) if values else None

    def growth(self, name: str, since: float) -> float:
        """Largest RSS now above the value at `since` (MB)."""
        base = next((mb for t, mb in self.series[name] if t >= since), None)
        top = self.peak(name)
        return 0.0 if base is None or top is None else round(top - base, 1)
