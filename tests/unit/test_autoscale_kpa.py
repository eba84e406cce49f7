"""The autoscaler's decision (kpa.py): windows, tolerance, panic, rate caps, cooldowns, limits,
scale to zero and back, the forecast floor and the TTFT objective - a pure function, no etcd."""

from __future__ import annotations

import math

import pytest

from services.controlplane.autoscaler.kpa import Limits, Memory, Signals, decide
from services.controlplane.autoscaler.policy import Policy

NOW = 10_000.0
NO_LIMITS = Limits()
P = Policy(model="m", enabled=True, min_replicas=1, max_replicas=8)


def sig(**kw) -> Signals:
    base: dict = {"ready": kw.get("ready", 1), "target": 5.0, "traffic": True, "observed_s": 600.0}
    base.update(kw)
    return Signals(**base)


def run(policy: Policy = P, signals: Signals | None = None, desired: int = 1, limits: Limits = NO_LIMITS,
        **memory):
    return decide(policy, signals or sig(), Memory(desired=desired, **memory), limits, NOW)


def test_short_window_above_target_scales_up_at_once():
    d = run(signals=sig(ready=1, stable_demand=3.0, panic_demand=8.0))
    assert (d.desired, d.code) == (2, "demand")
    assert "panic window" in d.reason


def test_demand_within_the_tolerance_band_changes_nothing():
    d = run(signals=sig(ready=2, stable_demand=10.5, panic_demand=10.5), desired=2)
    assert (d.desired, d.code) == (2, "hold")
    assert "within" in d.reason


def test_a_burst_enters_panic_and_panic_blocks_scale_down():
    burst = run(signals=sig(ready=2, stable_demand=5, panic_demand=25), desired=2)
    assert (burst.desired, burst.code) == (5, "panic")
    assert burst.panic_until == NOW + P.stable_window_s
    quiet = run(signals=sig(ready=5, stable_demand=1, panic_demand=0), desired=5,
                panic_until=burst.panic_until)
    assert quiet.desired == 5 and "panic mode" in quiet.reason


def test_scale_down_waits_for_a_full_stable_window_of_a_new_leader():
    d = run(signals=sig(ready=4, stable_demand=1, panic_demand=1, observed_s=10), desired=4)
    assert d.desired == 4 and "full stable window" in d.reason


def test_scale_down_is_capped_by_the_rate_and_held_by_the_cooldown():
    d = run(signals=sig(ready=8, stable_demand=1, panic_demand=0), desired=8)
    assert (d.desired, d.limit_code) == (4, "scale_down_rate")
    held = run(signals=sig(ready=4, stable_demand=1, panic_demand=0), desired=4,
               last_scale_down=NOW - 10)
    assert (held.desired, held.limit_code) == (4, "cooldown")


def test_scale_up_is_capped_by_the_rate_relative_to_ready_replicas():
    policy = Policy(model="m", enabled=True, min_replicas=1, max_replicas=50, max_scale_up_rate=2.0)
    d = run(policy, sig(ready=1, stable_demand=50, panic_demand=50))
    assert (d.desired, d.limit_code) == (2, "scale_up_rate")


@pytest.mark.parametrize("cap, code, words", [(math.inf, "max_replicas", "max_replicas 8"),
                                              (3, "budget", "budget region east")])
def test_max_and_budgets_are_never_crossed(cap, code, words):
    d = run(signals=sig(ready=2, stable_demand=100, panic_demand=100), desired=2,
            limits=Limits(cap=cap, cap_reason="budget region east: 3 replicas"))
    assert d.desired == (8 if cap == math.inf else 3)
    assert d.limit_code == code and words in d.limit


def test_a_lowered_budget_scales_down_to_fit():
    d = run(signals=sig(ready=5, stable_demand=25, panic_demand=25), desired=5,
            limits=Limits(cap=2, cap_reason="budget mesh-wide: 2 replicas"))
    assert (d.desired, d.code, d.limit_code) == (2, "budget", "budget")


ZERO = Policy(model="m", enabled=True, min_replicas=0, max_replicas=4, scale_to_zero=True,
              zero_grace_s=60)


def test_scale_to_zero_only_after_the_grace_without_traffic():
    idle = sig(ready=1, traffic=False, idle_s=70)
    assert (run(ZERO, idle).desired, run(ZERO, idle).code) == (0, "idle")
    recent = sig(ready=1, traffic=False, idle_s=30)
    assert run(ZERO, recent).desired == 1
    assert run(P, idle).desired == 1  # not opted in: min_replicas holds


def test_waiting_requests_activate_a_model_at_zero_at_once():
    d = run(ZERO, sig(ready=0, waiting_for_replica=3, panic_demand=3, traffic=True), desired=0,
            last_scale_down=NOW - 1)
    assert (d.desired, d.code) == (1, "activation")
    assert "3 request(s) waiting" in d.reason
    assert run(ZERO, sig(ready=0, traffic=False, idle_s=500), desired=0).desired == 0


def test_the_forecast_is_a_floor_only():
    raised = run(signals=sig(ready=2, stable_demand=10, panic_demand=10), desired=2,
                 limits=Limits(floor=4, floor_reason="forecast floor 4"))
    assert (raised.desired, raised.code, raised.reactive) == (4, "forecast", 2)
    held = run(signals=sig(ready=3, stable_demand=1, panic_demand=1), desired=3,
               last_scale_down=NOW - 5, limits=Limits(floor=4, floor_reason="forecast floor 4"))
    assert (held.desired, held.limit) == (4, "")  # the cooldown that held the step is moot
    below = run(signals=sig(ready=6, stable_demand=30, panic_demand=30), desired=6,
                limits=Limits(floor=1))
    assert below.desired == 6
    ahead_of_zero = run(ZERO, sig(ready=0, traffic=False, idle_s=500), desired=0,
                        limits=Limits(floor=2, floor_reason="forecast"))
    assert ahead_of_zero.desired == 2


def test_a_missed_ttft_objective_adds_one_replica_once_the_last_one_could_be_ready():
    policy = Policy(model="m", enabled=True, min_replicas=1, max_replicas=8, ttft_slo_ms=500)
    slow = sig(ready=2, stable_demand=10, panic_demand=10, queued=3, ttft_p95_ms=2000)
    d = run(policy, slow, desired=2, last_scale_up=NOW - 100, ready_time_s=20)
    assert (d.desired, d.code) == (3, "ttft_slo")
    assert run(policy, slow, desired=2, last_scale_up=NOW - 5, ready_time_s=20).desired == 2
    no_queue = sig(ready=2, stable_demand=10, panic_demand=10, queued=0, ttft_p95_ms=2000)
    assert run(policy, no_queue, desired=2, last_scale_up=NOW - 100).desired == 2


def test_kv_cache_use_counts_as_demand():
    d = run(signals=sig(ready=2, stable_demand=4, panic_demand=4, kv_utilization=1.0), desired=2)
    assert d.desired == 3 and "KV-cache" in d.reason
