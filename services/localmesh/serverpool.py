"""A pool of model-server processes sized by the control plane (`meshserve up --server-pool
MIN:MAX`): the local actuator below placement, as a cluster autoscaler is on Kubernetes.

Each step asks the control plane's GetCapacity: when placement lacks servers (replicas it could
not place for want of a server with room; budgets and halts do not count), the next planned server
starts, one at a time, and the next only once it serves; a pool server that has held nothing for
`idle_s` is stopped (it drains first), never going below MIN. Non-blocking, so `meshserve up` runs
it from its supervision loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.v1 import autoscale_pb2 as asp

from . import components as c
from .mesh import LocalMesh, ServerPlan

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSettings:
    min_servers: int
    max_servers: int
    idle_s: float = 60.0
    start_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not 0 <= self.min_servers <= self.max_servers or self.max_servers < 1:
            raise ValueError(f"server pool {self.min_servers}:{self.max_servers}: need "
                             "0 <= MIN <= MAX and MAX >= 1")
        if self.idle_s < 0 or self.start_timeout_s <= 0:
            raise ValueError("idle_s must be >= 0 and start_timeout_s > 0")


def parse_range(text: str) -> tuple[int, int]:
    """'1:4' -> (1, 4)."""
    low, sep, high = text.partition(":")
    try:
        return (int(low), int(high)) if sep else (int(low), int(low))
    except ValueError:
        raise ValueError(f"--server-pool {text!r}: expected MIN:MAX, e.g. 1:4") from None


class ServerPool:
    def __init__(self, mesh: LocalMesh, settings: PoolSettings,
                 capacity: Callable[[], asp.GetCapacityResponse],
                 clock: Callable[[], float] = time.monotonic,
                 serving: Callable[[str], bool] | None = None) -> None:
        self._mesh = mesh
        self.settings = settings
        self._capacity = capacity
        self._clock = clock
        self._serving = serving or self._health
        self.plans: list[ServerPlan] = [*mesh.plan.servers, *mesh.plan.standby_servers]
        self.starting: dict[str, float] = {}
        self._idle_since: dict[str, float] = {}
        self.started = self.stopped = 0

    def running(self) -> list[str]:
        return [p.server_id for p in self.plans if p.server_id in self._mesh.children
                and self._mesh.children[p.server_id].alive()]

    def step(self) -> None:
        now = self._clock()
        self._check_starting(now)
        try:
            cap = self._capacity()
        except Exception as exc:  # noqa: BLE001 - control plane away: change nothing this round
            log.debug("server pool: no capacity answer (%s)", exc)
            return
        running = self.running()
        if cap.servers_short > 0 and not self.starting and len(running) < self.settings.max_servers:
            self._start(running, cap.reason)
        self._stop_idle(set(cap.idle_servers) & set(running), running, now)

    def _start(self, running: list[str], why: str) -> None:
        plan = next(p for p in self.plans if p.server_id not in running)
        log.info("server pool: starting %s (%d of at most %d): %s", plan.server_id,
                 len(running) + 1, self.settings.max_servers, why)
        self._mesh.stop_server(plan.server_id)  # a dead one from before, if any
        self._mesh.start_server(plan, wait=False)
        self.starting[plan.server_id] = self._clock()
        self._idle_since.pop(plan.server_id, None)
        self.started += 1

    def _check_starting(self, now: float) -> None:
        for sid, since in list(self.starting.items()):
            child = self._mesh.children.get(sid)
            if child is None or not child.alive():
                log.warning("server pool: %s exited while starting; see %s", sid,
                            child.log_path if child else "its log")
                self._mesh.stop_server(sid)
                del self.starting[sid]
            elif self._serving(sid):
                log.info("server pool: %s serves after %.1fs", sid, now - since)
                del self.starting[sid]
            elif now - since > self.settings.start_timeout_s:
                log.warning("server pool: %s did not serve within %.0fs; stopping it", sid,
                            self.settings.start_timeout_s)
                self._mesh.stop_server(sid)
                del self.starting[sid]

    def _health(self, sid: str) -> bool:
        try:
            return c.grpc_serving(self._mesh.servers[sid], timeout=0.5)
        except Exception:  # noqa: BLE001 - not up yet
            return False

    def _stop_idle(self, idle: set[str], running: list[str], now: float) -> None:
        for sid in list(self._idle_since):
            if sid not in idle:
                del self._idle_since[sid]
        for sid in idle - self.starting.keys():
            self._idle_since.setdefault(sid, now)
        order = [p.server_id for p in reversed(self.plans)]  # the last planned goes first
        for sid in order:
            if len(running) <= self.settings.min_servers:
                return
            since = self._idle_since.get(sid)
            if since is None or now - since < self.settings.idle_s:
                continue
            log.info("server pool: stopping %s, idle for %.0fs", sid, now - since)
            self._mesh.stop_server(sid)
            running.remove(sid)
            del self._idle_since[sid]
            self.stopped += 1
