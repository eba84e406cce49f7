"""What placement lacks in servers, and which servers hold nothing: the interface of a server-pool
actuator (`meshserve up --server-pool`, or a cluster autoscaler) that starts and stops servers."""

from __future__ import annotations

from collections.abc import Mapping

from meshserve.v1 import autoscale_pb2 as asp

from services.common.membership import MeshView

from ..desired import plan_for


def capacity(view: MeshView, replicas: Mapping[str, int] | None = None) -> asp.GetCapacityResponse:
    plan = plan_for(view, replicas=replicas)
    short = max(plan.short.values(), default=0)
    busy = {sid for (sid, _) in view.placements}
    busy |= {sid for (sid, _), st in view.statuses.items() if not st.managed}
    idle = sorted(sid for sid in view.servers if sid not in busy and not view.is_draining(sid))
    reason = "; ".join(f"{m}: {n} replica(s) without a server ({plan.unsatisfied.get(m, '')})"
                       for m, n in sorted(plan.short.items()))
    return asp.GetCapacityResponse(servers_short=short, idle_servers=idle, reason=reason)
