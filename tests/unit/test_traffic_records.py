"""Traffic policy records and their graph: what is refused, with which reason, and why."""

from __future__ import annotations

import pytest
from meshserve.v1 import traffic_pb2 as tp

from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.traffic import graph, records, window


def split(name: str, **weights: int) -> tp.TrafficPolicy:
    msg = tp.TrafficPolicy(name=name)
    msg.split.targets.extend(tp.WeightedTarget(target=t.replace("_AT_", "@"), weight=w) for t, w in weights.items())
    return msg


def fallback(name: str, *links: str) -> tp.TrafficPolicy:
    return tp.TrafficPolicy(name=name, fallback=tp.FallbackPolicy(links=links))


def test_split_parses_with_versions():
    policy = records.parse(split("chat", m_AT_v1=90, m_AT_v2=10))
    assert policy.kind == "split"
    assert policy.targets() == ("m@v1", "m@v2")


@pytest.mark.parametrize("msg, words", [
    (split("chat", a=50, b=40), "add up to 90"),
    (split("chat", a=100, b=0, c=0, d=0, e=0, f=0, g=0, h=0, i=0, j=0, k=0, l=0, m=0, n=0, o=0, p=0, q=0), "1-16"),
    (split("chat@v1", a=100), "contains '@'"),
    (tp.TrafficPolicy(name="x"), "no kind"),
    (tp.TrafficPolicy(name="x", canary=tp.CanaryPolicy(stable="a", canary="a")), "both"),
    (tp.TrafficPolicy(name="x", canary=tp.CanaryPolicy(stable="a", canary="b", steps=[50, 25])), "must increase"),
    (tp.TrafficPolicy(name="x", canary=tp.CanaryPolicy(stable="a", canary="b", max_error_rate_increase=float("nan"))),
     "max_error_rate_increase"),
    (fallback("x", "a"), "2-8 links"),
    (fallback("x", "a", "a"), "listed twice"),
    (fallback("x", "a", "b b"), "links[1]"),
    (tp.TrafficPolicy(name="x", rules=tp.RulesPolicy(default_target="d", rules=[
        tp.RoutingRule(target="t", prompt_regex="(a)\\1")])), "not a valid RE2"),
    (tp.TrafficPolicy(name="x", rules=tp.RulesPolicy(default_target="d", rules=[
        tp.RoutingRule(target="t", headers=[tp.HeaderMatch(name="X-Tenant", values=["a"])])])), "lower-case"),
    (tp.TrafficPolicy(name="x", rules=tp.RulesPolicy(rules=[tp.RoutingRule(target="t")])), "default_target"),
    (tp.TrafficPolicy(name="x", ensemble=tp.EnsemblePolicy(
        members=[tp.EnsembleMember(target="a")], quorum=2)), "quorum 2"),
    (tp.TrafficPolicy(name="x", ensemble=tp.EnsemblePolicy(
        members=[tp.EnsembleMember(target="a", prompt_template="no placeholder")])), "{prompt}"),
])
def test_bad_records_are_refused_with_the_reason(msg, words):
    with pytest.raises(InvalidArgument) as info:
        records.parse(msg)
    assert words in info.value.message


def test_canary_defaults_and_weights():
    c = records.parse(tp.TrafficPolicy(name="x", canary=tp.CanaryPolicy(stable="a", canary="b"))).spec
    assert isinstance(c, records.Canary)
    assert c.steps == records.DEFAULT_STEPS and c.min_requests == 20 and c.window_s == 30
    assert records.canary_weight(c, tp.CANARY_PHASE_PROGRESSING, 1) == 25
    assert records.canary_weight(c, tp.CANARY_PHASE_ROLLED_BACK, 3) == 0
    assert records.canary_weight(c, tp.CANARY_PHASE_PROMOTED, 0) == 100


def parsed(*msgs: tp.TrafficPolicy) -> dict[str, records.Policy]:
    return {m.name: records.parse(m) for m in msgs}


def test_dangling_references_and_cycles_are_failed_preconditions():
    deployments = {"m@v1", "m@v2", "cpu"}
    stored = parsed(fallback("a", "b", "cpu"), split("b", m=100))  # "m" is the alias of m@v1, m@v2
    graph.check_write(records.parse(split("c", a=50, m_AT_v2=50)), stored, deployments)
    with pytest.raises(FailedPrecondition, match="target 'nothing' names no deployment"):
        graph.check_write(records.parse(split("c", nothing=100)), stored, deployments)
    with pytest.raises(FailedPrecondition, match="cycle: b -> a -> b"):
        graph.check_write(records.parse(split("b", a=100)), stored, deployments)
    with pytest.raises(FailedPrecondition, match="cycle: x -> x"):
        graph.check_write(records.parse(fallback("x", "x", "cpu")), stored, deployments)
    with pytest.raises(FailedPrecondition, match="deployment's name"):
        graph.check_write(records.parse(split("cpu", m=100)), stored, deployments)


def test_routers_drop_cycles_and_deep_nesting():
    chain = [split(f"p{i}", **{f"p{i + 1}": 100}) for i in range(graph.MAX_DEPTH + 1)]
    looped = parsed(split("a", b=100), split("b", a=100), split("ok", m=100), *chain)
    bad = graph.cyclic(looped)
    assert {"a", "b", "p0"} <= bad
    assert "ok" not in bad and f"p{graph.MAX_DEPTH}" not in bad


def test_referrers_of_a_version_and_its_alias():
    stored = parsed(split("chat", m=100), fallback("fb", "m@v1", "cpu"))
    assert graph.referrers("m@v1", stored, {"m@v1", "m@v2", "cpu"}) == ["fb"]
    assert graph.referrers("m@v1", stored, {"m@v1", "cpu"}) == ["chat", "fb"]  # the last version of m
    assert graph.referrers("cpu", stored, {"m@v1", "cpu"}) == ["fb"]


def test_window_p95_is_within_a_bucket():
    counts = [0] * window.N_BUCKETS
    for ms in range(1, 1001):  # 1..1000 ms, uniform: p95 ~ 950 ms
        counts[window.bucket(ms / 1000)] += 1
    p95 = window.quantile(counts, 0.95)
    assert 0.95 / window.GROWTH <= p95 <= 0.95 * window.GROWTH
    total = window.add([tp.TargetWindow(requests=3, errors=1, ttft_buckets=counts)] * 2)
    assert (total.requests, total.errors, sum(total.ttft_buckets)) == (6, 2, 2000)
