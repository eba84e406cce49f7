"""Answers to GetAutoscale and ExplainAutoscale: what is configured, what was decided, and - from
the leader's live numbers - why. Plain functions over the view and a model's track."""

from __future__ import annotations

from meshserve.v1 import autoscale_pb2 as asp
from meshserve.v1 import controlplane_pb2 as cp

from services.common.errors import NotFound
from services.common.membership import MeshView

from .effective import stored_desired
from .policy import Policy, as_record, stored_policy
from .track import ModelTrack


def _replicas(view: MeshView, model: str) -> tuple[int, int]:
    """(ready, placed)."""
    placed = sum(1 for (_, m) in view.placements if m == model)
    ready = sum(1 for (s, m), st in view.statuses.items()
                if m == model and st.state == cp.MODEL_STATE_READY and view.serving(s))
    return ready, placed


def _policy(view: MeshView, model: str) -> tuple[Policy, bool, str]:
    """(policy, configured, problem). NotFound for a model that is not deployed."""
    if model not in view.models:
        known = ", ".join(sorted(view.models)) or "none"
        raise NotFound(f"model {model!r} is not deployed (deployed: {known})")
    record = view.autoscale_policies.get(model)
    if record is None:
        spec = view.models[model]
        return Policy(model=model, min_replicas=spec.replicas, max_replicas=spec.replicas), False, ""
    policy, problem = stored_policy(model, record)
    if policy is None:
        return Policy(model=model), True, problem
    return policy, True, ""


def get(view: MeshView, model: str) -> asp.GetAutoscaleResponse:
    policy, configured, _ = _policy(view, model)
    record = view.autoscale_policies.get(model)
    ready, placed = _replicas(view, model)
    out = asp.GetAutoscaleResponse(policy=as_record(policy, record.updated_ms if record else 0),
                                   configured=configured, ready_replicas=ready,
                                   placed_replicas=placed)
    if record is not None:
        out.stored.CopyFrom(record)
    state = view.autoscale_states.get(model)
    if state is not None:
        out.state.CopyFrom(state)
    elif policy.enabled:
        out.state.desired_replicas = stored_desired(policy, None, view.models[model].replicas)
    return out


def stored(view: MeshView, model: str, answered_by: str) -> asp.ExplainAutoscaleResponse:
    """What is known without the leader's live numbers."""
    policy, _, problem = _policy(view, model)
    ready, placed = _replicas(view, model)
    out = asp.ExplainAutoscaleResponse(model=model, policy=as_record(policy),
                                       answered_by=answered_by, live=False, ready_replicas=ready,
                                       placed_replicas=placed,
                                       stable_window_s=policy.stable_window_s,
                                       panic_window_s=policy.panic_window_s)
    state = view.autoscale_states.get(model)
    if state is not None:
        out.state.CopyFrom(state)
        out.desired_replicas, out.reason, out.limit = (state.desired_replicas, state.reason,
                                                       state.limit)
    if problem:
        out.reason = problem
    elif not policy.enabled:
        out.reason = "autoscaling is off for this model: it keeps its deployed replicas"
    return out


def live(view: MeshView, track: ModelTrack, answered_by: str, now: float) -> asp.ExplainAutoscaleResponse:
    """The leader's own numbers for one model it autoscales."""
    p, obs, d, fc = track.policy, track.last_obs, track.last, track.forecast
    out = stored(view, p.model, answered_by)
    out.live = True
    out.state.CopyFrom(track.state)
    out.ready_replicas = obs.ready
    out.demand = obs.demand
    out.stable_demand = track.demand.average(now)
    out.panic_demand = track.demand.average(now, p.panic_window_s)
    out.target_concurrency = track.last_target
    out.kv_utilization = track.kv.average(now)
    out.router_queued, out.waiting_for_replica = obs.router_queued, obs.waiting_for_replica
    out.request_rate = track.rate.average(now)
    out.ttft_p95_ms, out.tokens_per_second = obs.ttft_p95_ms, obs.tokens_per_second
    out.forecast_rate, out.forecast_floor = fc.rate, fc.floor
    out.lead_time_s, out.forecast_note = fc.lead_s, fc.note
    out.history_buckets = track.history.measured()
    out.desired_replicas = track.state.desired_replicas
    if d is not None:
        out.panic = d.panic_until > now
        out.reactive_replicas = d.reactive
        out.reason, out.limit = d.reason, d.limit
    out.recent.extend(track.recent)
    return out
