"""Traffic policy over deployments scaled to zero: when no target is ready, a split, a fallback
chain or a version alias sends the request to a target that wakes from zero (it then waits in the
router's activation queue, and its arrival is the demand the leader scales on); while some target
is ready, the sleeping ones get nothing."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from meshserve.v1 import traffic_pb2 as tp

from services.common.errors import Unavailable
from services.router.traffic.executor import TrafficExecutor
from services.router.traffic.stats import CanaryRecorder
from services.router.traffic.table import TrafficTable
from tests.unit.test_traffic_executor import FakeMesh, FakeView, answer, fallback, request


def executor(behaviour: dict[str, str], *policies: tp.TrafficPolicy, ready: set[str], wakes: set[str],
             versions: dict[str, int] | None = None) -> tuple[TrafficExecutor, FakeMesh]:
    view = FakeView({**{m: 0 for m in behaviour}, **(versions or {})})
    for p in policies:
        view.put(p)
    mesh = FakeMesh(behaviour, ready)
    ex = TrafficExecutor(TrafficTable(view), mesh.serve, mesh.candidates, CanaryRecorder("r1"),  # type: ignore[arg-type]
                         rng=random.Random(1), wakes=wakes.__contains__)
    return ex, mesh


def split(*targets: tuple[str, int]) -> tp.TrafficPolicy:
    return tp.TrafficPolicy(name="m", split=tp.SplitPolicy(
        targets=[tp.WeightedTarget(target=t, weight=w) for t, w in targets]))


async def test_split_wakes_a_sleeping_target_only_when_none_is_ready():
    ex, mesh = executor({"m@v1": "ok", "m@v2": "ok"}, split(("m@v1", 50), ("m@v2", 50)),
                        ready={"m@v1"}, wakes={"m@v2"})
    for _ in range(20):
        await answer(ex, request("m"))
    assert Counter(r.model for r in mesh.calls) == {"m@v1": 20}
    mesh.ready, mesh.calls = set(), []
    for _ in range(20):
        await answer(ex, request("m"))
    assert Counter(r.model for r in mesh.calls) == {"m@v2": 20}


async def test_split_of_targets_that_cannot_wake_still_fails_at_once():
    ex, _ = executor({"m@v1": "ok", "m@v2": "ok"}, split(("m@v1", 50), ("m@v2", 50)), ready=set(), wakes=set())
    with pytest.raises(Unavailable, match="has a ready replica"):
        await answer(ex, request("m"))


async def test_fallback_wakes_its_first_sleeping_link_when_none_is_ready():
    ex, mesh = executor({"a": "ok", "b": "ok", "c": "ok"}, fallback("m", "a", "b", "c"), ready=set(),
                        wakes={"b", "c"})
    chunks = await answer(ex, request("m"))
    assert chunks[-1].served_by.route == "m[fallback:1]>b" and [r.model for r in mesh.calls] == ["b"]
    mesh.ready, mesh.calls = {"c"}, []
    assert (await answer(ex, request("m")))[-1].served_by.route == "m[fallback:2]>c"


async def test_alias_wakes_its_oldest_sleeping_version():
    ex, mesh = executor({"m@v1": "ok", "m@v2": "ok"}, ready=set(), wakes={"m@v2"},
                        versions={"m@v1": 100, "m@v2": 200})
    assert (await answer(ex, request("m")))[0].served_by.route == "m[alias]>m@v2"
    assert ex.available("m", leaf=ex.ready_or_wakes) and not ex.available("m")
