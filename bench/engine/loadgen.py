"""Client-side arrival logic and per-request timing shared by every runner (stdlib only).

A runner's loop asks `Arrivals.due(now, in_flight)` which requests start now, stamps each token
with `Record.token(now)`, and returns the records; the harness turns them into metrics, so every
system is measured by the same code.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Record:
    id: str
    max_tokens: int
    sent: float = 0.0  # when the client sent it (seconds from scenario start)
    times: list[float] = field(default_factory=list)  # when each output token reached the client
    error: str = ""

    def token(self, now: float, n: int = 1) -> None:
        self.times.extend([now] * n)

    @property
    def done(self) -> bool:
        return len(self.times) >= self.max_tokens or bool(self.error)

    def to_json(self) -> dict:
        return {"id": self.id, "max_tokens": self.max_tokens, "sent": self.sent,
                "times": self.times, "error": self.error}


class Clock:
    """Seconds since the scenario started."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


class Arrivals:
    """Which requests a scenario's clients send, and when."""

    def __init__(self, scenario: dict) -> None:
        self.concurrency = int(scenario.get("concurrency") or 0)
        self.pending = list(scenario["requests"])  # in send order

    def due(self, now: float, in_flight: int) -> list[tuple[dict, Record]]:
        """Requests sent by `now`: closed loop fills free client slots (sent now), open loop
        releases arrivals (sent at their scheduled time, even if the runner looks late)."""
        out: list[tuple[dict, Record]] = []
        if self.concurrency:
            while self.pending and in_flight + len(out) < self.concurrency:
                req = self.pending.pop(0)
                out.append((req, Record(req["id"], req["max_tokens"], sent=now)))
        else:
            while self.pending and self.pending[0]["arrival_s"] <= now:
                req = self.pending.pop(0)
                out.append((req, Record(req["id"], req["max_tokens"], sent=float(req["arrival_s"]))))
        return out

    def next_arrival(self) -> float | None:
        """When an idle open-loop runner should wake up; None when nothing is scheduled."""
        if self.concurrency or not self.pending:
            return None
        return float(self.pending[0]["arrival_s"])

    @property
    def exhausted(self) -> bool:
        return not self.pending


def wait_until(clock: Clock, t: float) -> None:
    delay = t - clock()
    if delay > 0:
        time.sleep(delay)
