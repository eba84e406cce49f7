"""The leader's active health checker: verdicts with thresholds, written to etcd on change.

Every interval each live server gets a grpc.health.v1 check (server-wide and per ready model);
every probe interval also a one-token generation on one of its ready models. A server becomes
NOT_SERVING after `unhealthy_after` consecutive failed rounds and SERVING again after
`healthy_after` good ones. Routers honour the verdicts; the placement planner moves models away.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace, names
from services.common.lifecycle import now_ms
from services.common.membership import MeshView

from . import metrics
from .probes import ServerProbe

log = logging.getLogger(__name__)


@dataclass
class HealthSettings:
    interval_s: float = 1.0
    probe_interval_s: float = 5.0
    timeout_s: float = 1.0
    probe_timeout_s: float = 5.0
    unhealthy_after: int = 3
    healthy_after: int = 2


@dataclass
class _Track:
    failures: int = 0
    successes: int = 0
    last_probe: float = 0.0
    probe_turn: int = 0
    reason: str = ""


@dataclass
class HealthChecker:
    view: MeshView
    probe: ServerProbe
    replica_id: str
    settings: HealthSettings = field(default_factory=HealthSettings)
    _tracks: dict[str, _Track] = field(default_factory=dict)

    async def check_round(self) -> tuple[dict[str, bytes], list[str]]:
        """One round over every live server; returns the etcd puts/deletes for changed verdicts."""
        # A server whose id breaks the naming rule (a record written around the API) is never
        # checked or placed on; it must not stop the round for everyone else.
        servers = {sid: info for sid, info in self.view.servers.items() if names.is_valid(sid)}
        results = await asyncio.gather(*(self._check(sid, info) for sid, info in servers.items()))
        puts: dict[str, bytes] = {}
        for sid, problem in zip(servers, results, strict=True):
            verdict = self._judge(sid, problem)
            if verdict is not None:
                puts[keyspace.health_key(sid)] = keyspace.encode(verdict)
        gone = [keyspace.HEALTH + sid for sid in self.view.health if sid not in servers]
        for sid in list(self._tracks):
            if sid not in servers:
                del self._tracks[sid]
        self.probe.forget(set(servers))
        return puts, gone

    async def _check(self, sid: str, info) -> str:
        track = self._tracks.setdefault(sid, _Track())
        started = time.monotonic()
        ready = self.view.ready_models(sid)
        services = [""] + [f"meshserve.v1.ModelServerService/{m}" for m in ready]
        problems = await asyncio.gather(*(self.probe.health(sid, info.address, s,
                                                            self.settings.timeout_s)
                                          for s in services))
        problem = next((p for p in problems if p), "")
        if not problem and ready and started - track.last_probe >= self.settings.probe_interval_s:
            track.last_probe = started
            model = ready[track.probe_turn % len(ready)]
            track.probe_turn += 1
            problem = await self.probe.generate_one_token(sid, info.address, model,
                                                          self.settings.probe_timeout_s)
            metrics.PROBES.labels("ok" if not problem else "failed").inc()
        metrics.CHECK_LATENCY.observe(time.monotonic() - started)
        metrics.CHECKS.labels("ok" if not problem else "failed").inc()
        return problem

    def _judge(self, sid: str, problem: str) -> cp.HealthVerdict | None:
        track = self._tracks[sid]
        current = self.view.verdict(sid)
        if problem:
            track.failures += 1
            track.successes = 0
            track.reason = problem
            if current != cp.SERVING_STATE_NOT_SERVING and track.failures >= self.settings.unhealthy_after:
                log.warning("server %s is NOT_SERVING after %d failed checks: %s", sid,
                            track.failures, problem)
                return cp.HealthVerdict(server_id=sid, state=cp.SERVING_STATE_NOT_SERVING,
                                        reason=problem, since_ms=now_ms(),
                                        consecutive_failures=track.failures,
                                        checked_by=self.replica_id)
        else:
            track.successes += 1
            track.failures = 0
            if current == cp.SERVING_STATE_NOT_SERVING and track.successes >= self.settings.healthy_after:
                log.info("server %s is SERVING again", sid)
                return cp.HealthVerdict(server_id=sid, state=cp.SERVING_STATE_SERVING,
                                        reason="recovered", since_ms=now_ms(),
                                        checked_by=self.replica_id)
        return None
