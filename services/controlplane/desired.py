"""From the mesh view to the placement planner's inputs, and back to deployment summaries.

Both the leader's reconciler and any replica answering ListDeployments call `plan_for`, so they
agree on what should be placed. Records read from etcd are checked here: a deployment record that
breaks the rules is reported and never placed, a server whose id breaks the naming rule is never
given a model, and halted models get no new replicas.
"""

from __future__ import annotations

from collections.abc import Mapping

from meshserve.v1 import controlplane_pb2 as cp

from services.common import names
from services.common.membership import MeshView

from . import budgets, halts
from .autoscaler.effective import effective_replicas
from .placement import ModelRequest, Plan, Server, plan
from .specs import stored_spec_problem


def split_models(view: MeshView) -> tuple[dict[str, cp.ModelSpec], dict[str, str]]:
    """Deployment records that may be placed, and the others with the reason."""
    valid, invalid = {}, {}
    for name, spec in view.models.items():
        problem = stored_spec_problem(name, spec)
        if problem:
            invalid[name] = problem
        else:
            valid[name] = spec
    return valid, invalid


def servers_from_view(view: MeshView) -> list[Server]:
    out = []
    for sid, info in view.servers.items():
        if not names.is_valid(sid):
            continue
        drain = view.drains.get(sid)
        out.append(Server(
            server_id=sid, region=info.region, zone=info.zone,
            memory_bytes=max(0, info.memory_bytes),
            usable=view.verdict(sid) != cp.SERVING_STATE_NOT_SERVING
            and not (drain is not None and drain.released),
            draining=drain is not None))
    return out


def requests_from_view(models: dict[str, cp.ModelSpec], records: halts.Records,
                       replicas: Mapping[str, int] | None = None) -> list[ModelRequest]:
    """`replicas`: counts that replace the deployed ones (the autoscaler's)."""
    counts = replicas or {}
    return [ModelRequest(name=spec.name, replicas=counts.get(spec.name, spec.replicas),
                         memory_bytes=spec.memory_bytes,
                         region_minimums=tuple((r.region, r.min_replicas) for r in spec.regions),
                         halted=halts.halted(records, spec) is not None)
            for spec in models.values()]


def current_from_view(view: MeshView) -> dict[str, set[str]]:
    current: dict[str, set[str]] = {}
    for (sid, model) in view.placements:
        current.setdefault(model, set()).add(sid)
    return current


def failed_from_view(view: MeshView, models: dict[str, cp.ModelSpec]) -> set[tuple[str, str]]:
    """Pairs where the current generation failed to load; the server keeps that report for its
    back-off period, and a new generation (a retry) may be placed there again."""
    return {(sid, m) for (sid, m), st in view.statuses.items()
            if st.state == cp.MODEL_STATE_FAILED and st.managed and m in models
            and st.generation == models[m].generation}


def plan_for(view: MeshView, records: halts.Records | None = None,
             replicas: Mapping[str, int] | None = None) -> Plan:
    """`records`: load-failure records newer than the view (the leader's own, just written);
    `replicas`: the autoscaler's counts when newer than the view (else its stored decisions)."""
    records = view.load_failures if records is None else records
    counts = effective_replicas(view) if replicas is None else replicas
    models, invalid = split_models(view)
    result = plan(requests_from_view(models, records, counts), servers_from_view(view),
                  current_from_view(view), failed_from_view(view, models),
                  budgets.from_record(view.scaling_budgets))
    for name, spec in models.items():
        record = halts.halted(records, spec)
        if record is not None:
            result.unsatisfied[name] = halts.halt_reason(record)
    result.unsatisfied.update(invalid)
    return result


def deployments(view: MeshView, computed: Plan | None = None) -> list[cp.Deployment]:
    computed = computed or plan_for(view)
    out = []
    for name in sorted(view.models):
        spec = view.models[name]
        placed = [s for (s, m) in view.placements if m == name]
        ready = [s for s in placed
                 if view.statuses.get((s, name)) is not None
                 and view.statuses[(s, name)].state == cp.MODEL_STATE_READY]
        out.append(cp.Deployment(spec=spec, placed_replicas=len(placed),
                                 ready_replicas=len(ready),
                                 unsatisfied_reason=computed.unsatisfied.get(name, ""),
                                 halted=halts.halted(view.load_failures, spec) is not None,
                                 failures=halts.current_failures(view.load_failures, spec)))
    return out
