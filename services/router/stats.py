"""What this router tells the control-plane leader's autoscaler, per model: requests received (a
counter), requests in flight, and time to first token over the last 30 s. Updated in memory on
the request path (a counter bump, a deque append), read by RouterLoadService when the leader
asks; nothing here ever writes to etcd."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

TTFT_WINDOW_S = 30.0
MAX_SAMPLES = 4096


@dataclass
class _Model:
    requests_total: int = 0
    in_flight: int = 0
    ttft: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))


@dataclass(frozen=True)
class ModelFigures:
    model: str
    requests_total: int
    in_flight: int
    ttft_p95_s: float
    ttft_samples: int


class RouterStats:
    def __init__(self) -> None:
        self._models: dict[str, _Model] = {}

    def _get(self, model: str) -> _Model:
        found = self._models.get(model)
        if found is None:
            found = self._models[model] = _Model()
        return found

    def arrived(self, model: str) -> None:
        self._get(model).requests_total += 1

    def started(self, model: str) -> None:
        self._get(model).in_flight += 1

    def finished(self, model: str) -> None:
        m = self._get(model)
        m.in_flight = max(0, m.in_flight - 1)

    def first_token(self, model: str, seconds: float) -> None:
        self._get(model).ttft.append((time.monotonic(), seconds))

    def figures(self, now: float | None = None) -> list[ModelFigures]:
        now = time.monotonic() if now is None else now
        out = []
        for name, m in sorted(self._models.items()):
            while m.ttft and now - m.ttft[0][0] > TTFT_WINDOW_S:
                m.ttft.popleft()
            values = sorted(v for _, v in m.ttft)
            p95 = values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)] if values else 0.0
            out.append(ModelFigures(name, m.requests_total, m.in_flight, p95, len(values)))
        return out
