"""One tick's measurement of one model, from the view (which replicas are READY) and the signal
feed (their load reports, the routers' demand)."""

from __future__ import annotations

from dataclasses import dataclass

from meshserve.v1 import controlplane_pb2 as cp

from services.common.membership import MeshView
from services.modelserver.engine import options as engine_options

from .signals import Demand, Snapshot


@dataclass(frozen=True)
class Observation:
    ready: int = 0
    placed: int = 0
    #: Requests in flight or queued at the replicas (or, where replicas cannot report, what the
    #: routers have in flight there) plus those waiting in routers.
    demand: float = 0.0
    queued: float = 0.0  # of which waiting: at replicas, in routers' queues, for a replica
    kv_used: int = 0
    kv_total: int = 0
    max_running: float = 0.0  # per ready replica that reported (0 = none did)
    router_queued: int = 0
    waiting_for_replica: int = 0
    arrivals: int = 0
    ttft_p95_ms: float = 0.0
    tokens_per_second: float = 0.0

    @property
    def traffic(self) -> bool:
        return self.demand > 0 or self.arrivals > 0 or self.waiting_for_replica > 0

    @property
    def kv_utilization(self) -> float:
        return self.kv_used / self.kv_total if self.kv_total else 0.0


def observe(view: MeshView, model: str, snap: Snapshot) -> Observation:
    ready_servers = [s for (s, m), st in view.statuses.items()
                     if m == model and st.state == cp.MODEL_STATE_READY and view.serving(s)]
    placed = sum(1 for (_, m) in view.placements if m == model)
    in_flight = queued = 0
    kv_used = kv_total = 0
    max_running = tps = 0.0
    reported = 0
    for sid in ready_servers:
        report = snap.loads.get(sid)
        load = next((x for x in report.models if x.model == model), None) if report else None
        if load is None or load.unknown:
            continue
        reported += 1
        in_flight += load.running + load.queue_depth
        queued += load.queue_depth
        kv_used += load.kv_blocks_used
        kv_total += load.kv_blocks_total
        max_running += load.max_running
        tps += load.tokens_per_second
    d = snap.demand.get(model, Demand())
    waiting = d.queued + d.waiting_for_replica
    return Observation(
        ready=len(ready_servers), placed=placed,
        demand=max(in_flight, d.in_flight) + waiting, queued=queued + waiting,
        kv_used=kv_used, kv_total=kv_total,
        max_running=max_running / reported if reported else 0.0,
        router_queued=d.queued, waiting_for_replica=d.waiting_for_replica,
        arrivals=snap.arrivals.get(model, 0), ttft_p95_ms=d.ttft_p95_ms, tokens_per_second=tps)


def spec_max_running(spec: cp.ModelSpec) -> float:
    """A replica's running capacity when none reports: the deployment's option or the backend's
    default."""
    raw = spec.options.get("max_running")
    try:
        if raw is not None:
            return float(raw)
        value = engine_options.defaults(spec.backend).get("max_running", 0)
        return float(value) if isinstance(value, int | float) else 0.0
    except ValueError:  # an unknown backend (InvalidArgument) or text that is no number
        return 0.0
