"""One model's replica decision: a pure function of its policy, the averaged signals and what the
leader remembers (last changes, panic). Unit-tested without etcd or gRPC.

Knative's KPA is the model: demand (requests in flight or queued) averaged over a stable window
and a short panic window, divided by the target per replica; panic mode when the short window asks
for `panic_threshold` x the ready replicas, during which nothing scales down, and which ends a
stable window after the last such burst; scale-up capped at `max_scale_up_rate` x ready replicas,
scale-down at ready / `max_scale_down_rate`. One deliberate difference: a scale-up is decided as
soon as the short window is above target by more than the tolerance (KPA waits for the stable
window below the panic threshold), so a ramp is met within seconds; scale-down still follows the
stable window, the tolerance band and a cooldown. A second signal, KV-cache use, counts as demand,
and a TTFT objective adds one replica at a time while work queues.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .policy import Policy

EPS = 1e-9


@dataclass(frozen=True)
class Signals:
    """What the leader measured for one model, windows already averaged."""

    ready: int = 0
    stable_demand: float = 0.0
    panic_demand: float = 0.0
    #: Requests waiting (at replicas or in routers), averaged over the panic window.
    queued: float = 0.0
    kv_utilization: float = 0.0  # KV blocks used / total over the ready replicas (stable window)
    waiting_for_replica: int = 0  # requests in routers waiting for a first replica
    traffic: bool = False  # any request arrived, ran or waited since the last tick
    idle_s: float = 0.0  # seconds since the last traffic
    observed_s: float = math.inf  # seconds of signals this leader has (a new leader starts at 0)
    ttft_p95_ms: float = 0.0
    target: float = 1.0  # requests in flight per replica aimed for


@dataclass(frozen=True)
class Memory:
    """What the decision remembers between ticks (kept in the AutoscaleState record)."""

    desired: int
    last_scale_up: float = 0.0  # Unix seconds
    last_scale_down: float = 0.0
    panic_until: float = 0.0
    ready_time_s: float = 0.0

    @property
    def last_change(self) -> float:
        return max(self.last_scale_up, self.last_scale_down)


@dataclass(frozen=True)
class Limits:
    """Bounds from outside the windows: the budgets' cap and the forecast's floor."""

    cap: float = math.inf
    cap_reason: str = ""
    floor: int = 0
    floor_reason: str = ""


@dataclass(frozen=True)
class Decision:
    desired: int
    reactive: int  # what demand alone asks for
    code: str  # short, for metrics: hold, demand, panic, activation, ttft_slo, forecast, idle, min, max, budget
    reason: str  # in words
    limit: str = ""  # what capped it
    limit_code: str = ""  # max_replicas, budget, scale_up_rate, scale_down_rate, cooldown
    panic_until: float = 0.0

    def changed(self, current: int) -> bool:
        return self.desired != current


@dataclass
class _Step:
    desired: int
    code: str
    reason: str
    limit: str = ""
    limit_code: str = ""


def _want(p: Policy, s: Signals) -> tuple[float, float, float]:
    target = max(s.target, EPS)
    kv = s.ready * s.kv_utilization / p.kv_target if s.ready else 0.0
    return s.stable_demand / target, s.panic_demand / target, kv


def _up(p: Policy, s: Signals, m: Memory, want: float, which: str, now: float) -> _Step:
    cur, wanted = m.desired, math.ceil(want - EPS)
    left = p.scale_up_cooldown_s - (now - m.last_change)
    if left > 0:
        return _Step(cur, "hold", f"{which} asks for {wanted}, scale-up cooldown {left:.0f}s left",
                     "scale-up cooldown", "cooldown")
    cap = max(cur + 1, math.ceil(max(s.ready, 1) * p.max_scale_up_rate - EPS))
    reason = f"{which} {want * s.target:.1f} in flight for target {s.target:.1f} per replica"
    if wanted > cap:
        return _Step(cap, "demand", reason, f"max_scale_up_rate {p.max_scale_up_rate:g} x "
                     f"{max(s.ready, 1)} ready", "scale_up_rate")
    return _Step(wanted, "demand", reason)


def _down(p: Policy, s: Signals, m: Memory, want: float, panic_until: float, now: float) -> _Step:
    cur, wanted = m.desired, math.ceil(want - EPS)
    if panic_until > now:
        return _Step(cur, "hold", f"panic mode: no scale-down for {panic_until - now:.0f}s")
    if s.observed_s < p.stable_window_s:
        return _Step(cur, "hold", "a new leader: scale-down waits for a full stable window "
                     f"({s.observed_s:.0f}/{p.stable_window_s:.0f}s observed)")
    left = p.scale_down_cooldown_s - (now - m.last_change)
    if left > 0:
        return _Step(cur, "hold", f"demand asks for {wanted}, scale-down cooldown {left:.0f}s left",
                     "scale-down cooldown", "cooldown")
    lowest = math.floor(cur / p.max_scale_down_rate + EPS)
    reason = (f"stable demand {s.stable_demand:.1f} in flight for target {s.target:.1f} per "
              "replica")
    if wanted < lowest:
        return _Step(lowest, "demand", reason,
                     f"max_scale_down_rate {p.max_scale_down_rate:g}", "scale_down_rate")
    return _Step(wanted, "demand", reason)


def _reactive(p: Policy, s: Signals, m: Memory, panic_until: float, now: float) -> _Step:
    stable, panic, kv = _want(p, s)
    want = max(stable, panic, kv)
    cur = m.desired
    if cur == 0:
        if s.waiting_for_replica or s.traffic:
            n = max(1, math.ceil(panic - EPS))
            return _Step(n, "activation", f"{s.waiting_for_replica} request(s) waiting for a "
                         "first replica" if s.waiting_for_replica else "traffic arrived at zero")
        return _Step(0, "hold", "scaled to zero: no traffic")
    which = "KV-cache use" if want == kv and kv > max(stable, panic) else (
        "panic window" if panic >= stable else "stable window")
    if want > cur * (1 + p.tolerance) and math.ceil(want - EPS) > cur:
        return _up(p, s, m, want, which, now)
    if want < cur * (1 - p.tolerance) and math.ceil(want - EPS) < cur:
        return _down(p, s, m, want, panic_until, now)
    return _Step(cur, "hold", f"demand {want * s.target:.1f} in flight is within "
                 f"{p.tolerance:.0%} of {cur} x {s.target:.1f}")


def _slo(p: Policy, s: Signals, m: Memory, step: _Step, now: float) -> _Step:
    """A TTFT objective missed while work queues: one replica more, once the previous one had
    time to become ready."""
    cur = m.desired
    if not p.ttft_slo_ms or cur == 0 or step.desired > cur or s.queued <= 0:
        return step
    if s.ttft_p95_ms <= p.ttft_slo_ms:
        return step
    settle = max(m.ready_time_s, p.panic_window_s, p.scale_up_cooldown_s)
    if now - m.last_change < settle:
        return step
    return _Step(cur + 1, "ttft_slo", f"TTFT p95 {s.ttft_p95_ms:.0f} ms is above the objective "
                 f"{p.ttft_slo_ms:.0f} ms with {s.queued:.1f} request(s) queued")


def _idle(p: Policy, s: Signals) -> bool:
    """Opted in, and no traffic for the whole grace: the model goes to zero."""
    return (p.scale_to_zero and not s.traffic and not s.waiting_for_replica
            and s.idle_s >= p.zero_grace_s and s.observed_s >= p.panic_window_s)


def _bounds(p: Policy, s: Signals, m: Memory, lim: Limits, step: _Step) -> _Step:
    out = _Step(step.desired, step.code, step.reason, step.limit, step.limit_code)
    idle = _idle(p, s)
    if idle and m.desired > 0 and lim.floor == 0:
        out = _Step(0, "idle", f"no traffic for {s.idle_s:.0f}s (scale to zero after "
                    f"{p.zero_grace_s:.0f}s)")
    if out.desired < lim.floor:  # what held the reactive step back no longer matters
        out = _Step(lim.floor, "forecast", lim.floor_reason)
    lower = 0 if idle or (m.desired == 0 and not s.traffic and not s.waiting_for_replica) \
        else p.floor
    if out.desired < lower:
        out = _Step(lower, "min", f"min_replicas {p.floor}")
    if out.desired > p.max_replicas:
        out.desired, out.limit, out.limit_code = p.max_replicas, f"max_replicas {p.max_replicas}", "max_replicas"
        if out.desired < m.desired:
            out.code, out.reason = "max", f"max_replicas is {p.max_replicas}"
    if out.desired > lim.cap:
        out.desired, out.limit, out.limit_code = max(0, int(lim.cap)), lim.cap_reason, "budget"
        if out.desired < m.desired:
            out.code, out.reason = "budget", lim.cap_reason
    return out


def decide(p: Policy, s: Signals, m: Memory, lim: Limits, now: float) -> Decision:
    """The replicas a model should have now, and why."""
    _, panic, _ = _want(p, s)
    panic_until = m.panic_until
    bursting = m.desired > 0 and panic > 0 and panic / max(s.ready, 1) >= p.panic_threshold
    if bursting:
        panic_until = now + p.stable_window_s
    step = _reactive(p, s, m, panic_until, now)
    if bursting and step.code == "demand" and step.desired > m.desired:
        step.code = "panic"
    reactive = step.desired
    step = _bounds(p, s, m, lim, _slo(p, s, m, step, now))
    if step.desired == m.desired:
        step.code = "hold"
    return Decision(desired=step.desired, reactive=reactive, code=step.code, reason=step.reason,
                    limit=step.limit, limit_code=step.limit_code, panic_until=panic_until)
