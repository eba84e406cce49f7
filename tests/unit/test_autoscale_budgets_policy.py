"""Scaling budgets in the planner (never crossed, reported when they bind, not counted as a
shortage of servers), the autoscaler's cap from them, and the checks on autoscale policies."""

from __future__ import annotations

import math

import pytest
from meshserve.v1 import autoscale_pb2 as asp

from services.common.errors import InvalidArgument
from services.controlplane import budgets
from services.controlplane.autoscaler.policy import DEFAULTS, as_record, resolve, validate
from services.controlplane.placement import ModelRequest, Server, plan

SERVERS = [Server("e1", "east", "east-a"), Server("e2", "east", "east-b"), Server("e3", "east", "east-a"),
           Server("w1", "west", "west-a"), Server("w2", "west", "west-b")]
GIB = 2**30


def test_the_planner_never_crosses_a_budget_and_says_which_one_binds():
    caps = [budgets.Budget("east", max_replicas=2), budgets.Budget("west", "west-a", max_replicas=1)]
    result = plan([ModelRequest("a", 5, region_minimums=(("east", 0),))], SERVERS, {}, budgets=caps)
    assert len(result.placements["a"]) == 2
    assert "budget region east: 2 replicas" in result.unsatisfied["a"]
    assert "a" not in result.short  # more servers would not help
    both = plan([ModelRequest("a", 2), ModelRequest("b", 4)], SERVERS, {}, budgets=caps)
    placed = [s for servers in both.placements.values() for s in servers]
    assert sum(s.startswith("e") for s in placed) == 2  # the east budget covers both models
    assert placed.count("w1") == 1  # west-a (only w1) holds one replica of all models


def test_replicas_already_placed_stay_when_a_budget_is_lowered():
    caps = [budgets.Budget(max_replicas=1)]
    result = plan([ModelRequest("a", 3)], SERVERS, {"a": {"e1", "w1", "e2"}}, budgets=caps)
    assert result.placements["a"] == {"e1", "w1", "e2"}


def test_memory_budgets_count_bytes_and_shortage_counts_missing_servers():
    caps = [budgets.Budget(max_memory_bytes=3 * GIB)]
    result = plan([ModelRequest("a", 5, memory_bytes=GIB)], SERVERS, {}, budgets=caps)
    assert len(result.placements["a"]) == 3 and "3 GiB" in result.unsatisfied["a"]
    short = plan([ModelRequest("a", 7)], SERVERS, {})
    assert short.short == {"a": 2}


def test_model_cap_adds_regions_and_fully_budgeted_zones():
    by_id = {s.server_id: s for s in SERVERS}
    use = budgets.BudgetUse([budgets.Budget("east", max_replicas=3),
                             budgets.Budget("west", "west-a", max_replicas=1),
                             budgets.Budget("west", "west-b", max_replicas=2)], by_id)
    use.add("e1", 0)  # another model's replica in east
    cap, binding = budgets.model_cap(use, SERVERS, None, 0)
    assert cap == 2 + 3 and binding is not None
    assert budgets.model_cap(use, SERVERS, {"east"}, 0)[0] == 2
    free = budgets.BudgetUse([budgets.Budget("east", max_replicas=3)], by_id)
    assert budgets.model_cap(free, SERVERS, None, 0) == (math.inf, None)  # west is unbudgeted
    mesh = budgets.BudgetUse([budgets.Budget(max_replicas=4)], by_id)
    assert budgets.model_cap(mesh, SERVERS, None, 0)[0] == 4


@pytest.mark.parametrize("budget, words", [
    (asp.ScalingBudget(region="east", max_replicas=-1), ">= 0"),
    (asp.ScalingBudget(zone="a", max_replicas=1), "needs its region"),
    (asp.ScalingBudget(region="east"), "caps nothing"),
    (asp.ScalingBudget(region="no/slash", max_replicas=1), "region"),
])
def test_bad_budgets_are_refused(budget, words):
    with pytest.raises(InvalidArgument, match=words):
        budgets.validate_record(asp.ScalingBudgets(budgets=[budget]))


def policy(**kw) -> asp.AutoscalePolicy:
    record = asp.AutoscalePolicy(model="m", enabled=True, min_replicas=1, max_replicas=4)
    for name, value in kw.items():
        setattr(record, name, value)
    return record


@pytest.mark.parametrize("record, words", [
    (policy(min_replicas=5), "above max_replicas"),
    (policy(max_replicas=0), "max_replicas must be in"),
    (policy(min_replicas=-1), "min_replicas must be >= 0"),
    (policy(stable_window_s=-5), "stable_window_s"),
    (policy(scale_down_cooldown_s=-1), "scale_down_cooldown_s"),
    (policy(target_utilization=1.5), "target_utilization"),
    (policy(tolerance=float("nan")), "finite"),
    (policy(scale_to_zero=True), "needs min_replicas 0"),
    (policy(bucket_s=60, season_s=90), "whole number of buckets"),
    (policy(bucket_s=1, season_s=86400), "2 to 2048 buckets"),
    (policy(stable_window_s=6, panic_window_pct=10), "panic window"),
    (policy(model="a/b"), "'/'"),
])
def test_bad_policies_are_refused_with_the_field(record, words):
    with pytest.raises(InvalidArgument, match=words):
        validate(record)


def test_unset_knobs_take_kpa_like_defaults_and_set_ones_stick():
    p = validate(policy(tolerance=0.0, scale_down_cooldown_s=0))
    assert (p.stable_window_s, p.panic_window_s, p.panic_threshold) == (60, 6, 2)
    assert (p.tolerance, p.scale_down_cooldown_s, p.max_scale_down_rate) == (0.0, 0.0, 2.0)
    shown = as_record(resolve(policy()))
    assert shown.HasField("target_utilization") and shown.target_utilization == DEFAULTS.target_utilization


@pytest.mark.parametrize("text, memory, expected", [
    ("*=20", False, ("", "", 20)), ("east=8", False, ("east", "", 8)),
    ("east/east-a=4", False, ("east", "east-a", 4)), ("east=64GiB", True, ("east", "", 64 * GIB)),
])
def test_meshctl_budget_scopes_and_units(text, memory, expected):
    from services.cli.ctl_autoscale import _budget

    assert _budget(text, memory) == expected
