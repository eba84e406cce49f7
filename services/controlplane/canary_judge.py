"""Judging a canary step: a pure function of the policy, the current state, both sides' figures
over the window (summed over routers) and the time. It decides roll back, next step, promoted,
or wait - and says why in words `meshctl traffic list` shows.

Roll back (at any time, once the canary has `min_requests` in the window) when its error rate
exceeds the stable side's by more than `max_error_increase` (against 0% when the stable side has
too few requests to compare, e.g. at a 100% step), or its TTFT p95 exceeds the stable side's by
more than `max_ttft_increase` (only when both sides have `min_requests` first tokens, and never for
a difference under TTFT_FLOOR_S, below which p95s of small windows are noise). Move on when
the step has lasted `step_s` with `min_requests` on the canary and no regression; after the last
step the canary is PROMOTED (100%).
"""

from __future__ import annotations

from meshserve.v1 import traffic_pb2 as tp

from services.common.traffic import window
from services.common.traffic.records import Canary

PROGRESSING = tp.CANARY_PHASE_PROGRESSING
TTFT_FLOOR_S = 0.02


def _pct(w: tp.TargetWindow) -> str:
    return f"{100 * window.error_rate(w):.1f}% ({w.errors}/{w.requests})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f}ms"


def regression(spec: Canary, stable: tp.TargetWindow, canary: tp.TargetWindow) -> str:
    """Why the canary is worse than stable beyond the margins ('' = it is not)."""
    if canary.requests < spec.min_requests:
        return ""
    baseline = window.error_rate(stable) if stable.requests >= spec.min_requests else 0.0
    if window.error_rate(canary) - baseline > spec.max_error_increase:
        return (f"canary error rate {_pct(canary)} exceeds stable {_pct(stable)} by more than "
                f"{100 * spec.max_error_increase:g} points")
    enough = min(window.ttft_samples(stable), window.ttft_samples(canary)) >= spec.min_requests
    allowed = max(stable.ttft_p95_s * spec.max_ttft_increase, TTFT_FLOOR_S)
    if enough and canary.ttft_p95_s - stable.ttft_p95_s > allowed:
        return (f"canary TTFT p95 {_ms(canary.ttft_p95_s)} exceeds stable {_ms(stable.ttft_p95_s)} by more "
                f"than {100 * spec.max_ttft_increase:g}%")
    return ""


def judge(spec: Canary, state: tp.CanaryState, stable: tp.TargetWindow, canary: tp.TargetWindow,
          now_ms: int) -> tp.CanaryState:
    """The next state (a copy; the same phase and step with a fresh reason when nothing moves)."""
    out = tp.CanaryState()
    out.CopyFrom(state)
    out.stable.CopyFrom(stable)
    out.canary.CopyFrom(canary)
    out.updated_ms = now_ms
    if state.phase != PROGRESSING:
        return out
    step = min(state.step, len(spec.steps) - 1)
    here = f"step {step + 1}/{len(spec.steps)} ({spec.steps[step]}%)"
    figures = (f"errors {_pct(canary)} vs {_pct(stable)}, TTFT p95 {_ms(canary.ttft_p95_s)} vs "
               f"{_ms(stable.ttft_p95_s)}")
    worse = regression(spec, stable, canary)
    if worse:
        out.phase = tp.CANARY_PHASE_ROLLED_BACK
        out.reason = f"rolled back at {here}: {worse}"
        return out
    lasted_s = (now_ms - state.step_since_ms) / 1000
    if canary.requests < spec.min_requests:
        out.reason = f"{here}: waiting for {spec.min_requests} canary requests in the window (have {canary.requests})"
        return out
    if lasted_s < spec.step_s:
        out.reason = f"{here}: healthy for {lasted_s:.0f}s of {spec.step_s}s ({figures})"
        return out
    if step + 1 < len(spec.steps):
        out.step = step + 1
        out.step_since_ms = now_ms
        out.reason = f"step {step + 1} ({spec.steps[step]}%) healthy for {spec.step_s}s ({figures}); now " \
                     f"{spec.steps[step + 1]}%"
        return out
    out.phase = tp.CANARY_PHASE_PROMOTED
    out.reason = f"promoted: the last step ({spec.steps[step]}%) was healthy for {spec.step_s}s ({figures})"
    return out


def moved(before: tp.CanaryState, after: tp.CanaryState) -> bool:
    """A change routers must hear of at once (the figures alone can wait)."""
    return (before.phase, before.step, before.generation) != (after.phase, after.step, after.generation)
