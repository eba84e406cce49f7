"""From the mesh view to the placement planner's inputs, and back to deployment summaries.

Both the leader's reconciler and any replica answering ListDeployments call `plan_for`, so they
agree on what should be placed.
"""

from __future__ import annotations

from meshserve.v1 import controlplane_pb2 as cp

from services.common.membership import MeshView

from .placement import ModelRequest, Plan, Server, plan


def servers_from_view(view: MeshView) -> list[Server]:
    out = []
    for sid, info in view.servers.items():
        drain = view.drains.get(sid)
        out.append(Server(
            server_id=sid, region=info.region, zone=info.zone, memory_bytes=info.memory_bytes,
            usable=view.verdict(sid) != cp.SERVING_STATE_NOT_SERVING
            and not (drain is not None and drain.released),
            draining=drain is not None))
    return out


def requests_from_view(view: MeshView) -> list[ModelRequest]:
    return [ModelRequest(name=spec.name, replicas=spec.replicas, memory_bytes=spec.memory_bytes,
                         region_minimums=tuple((r.region, r.min_replicas) for r in spec.regions))
            for spec in view.models.values()]


def current_from_view(view: MeshView) -> dict[str, set[str]]:
    current: dict[str, set[str]] = {}
    for (sid, model) in view.placements:
        current.setdefault(model, set()).add(sid)
    return current


def failed_from_view(view: MeshView) -> set[tuple[str, str]]:
    """Pairs whose load failed; the server keeps that report for its back-off period."""
    return {pair for pair, st in view.statuses.items() if st.state == cp.MODEL_STATE_FAILED}


def plan_for(view: MeshView) -> Plan:
    return plan(requests_from_view(view), servers_from_view(view), current_from_view(view),
                failed_from_view(view))


def deployments(view: MeshView, computed: Plan | None = None) -> list[cp.Deployment]:
    computed = computed or plan_for(view)
    out = []
    for name in sorted(view.models):
        placed = [s for (s, m) in view.placements if m == name]
        ready = [s for s in placed
                 if view.statuses.get((s, name)) is not None
                 and view.statuses[(s, name)].state == cp.MODEL_STATE_READY]
        out.append(cp.Deployment(spec=view.models[name], placed_replicas=len(placed),
                                 ready_replicas=len(ready),
                                 unsatisfied_reason=computed.unsatisfied.get(name, "")))
    return out
