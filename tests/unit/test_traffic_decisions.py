"""The pure decisions of traffic policy: weighted choice and sessions, rules, ensemble combiners,
and the canary judge."""

from __future__ import annotations

import random
from collections import Counter

from meshserve.v1 import common_pb2
from meshserve.v1 import traffic_pb2 as tp

from services.common.traffic import records, window
from services.controlplane.canary_judge import judge, moved, regression
from services.router.traffic import choose, combine, rules


def test_split_follows_the_weights():
    rng = random.Random(7)
    counts = Counter(choose.pick([("a", 90), ("b", 10)], rng=rng) for _ in range(20_000))
    assert abs(counts["b"] / 20_000 - 0.10) < 0.01
    sessions = Counter(choose.pick([("a", 75), ("b", 25)], session=f"s{i}") for i in range(20_000))
    assert abs(sessions["b"] / 20_000 - 0.25) < 0.015


def test_sessions_stay_and_a_growing_canary_only_takes_sessions():
    keys = [f"user-{i}" for i in range(3000)]
    at5 = {k: choose.pick([("stable", 95), ("canary", 5)], session=k) for k in keys}
    at25 = {k: choose.pick([("stable", 75), ("canary", 25)], session=k) for k in keys}
    assert at5 == {k: choose.pick([("stable", 95), ("canary", 5)], session=k) for k in keys}  # stable per session
    assert all(at25[k] == "canary" for k in keys if at5[k] == "canary")  # never back to stable
    assert choose.pick([("a", 0)]) is None


def rules_policy() -> records.Rules:
    msg = tp.TrafficPolicy(name="chat", rules=tp.RulesPolicy(default_target="small", rules=[
        tp.RoutingRule(name="acme", headers=[tp.HeaderMatch(name="x-tenant", values=["acme"])], target="acme"),
        tp.RoutingRule(name="eu-critical", regions=["eu"], priorities=[common_pb2.PRIORITY_CRITICAL], target="eu"),
        tp.RoutingRule(name="long", min_prompt_tokens=100, target="big"),
        tp.RoutingRule(name="code", prompt_regex=r"(?i)\bdef\s+\w+\(", target="coder"),
    ]))
    spec = records.parse(msg).spec
    assert isinstance(spec, records.Rules)
    return spec


def decide(text: str, headers: dict | None = None, region: str = "us", priority: int = 2) -> tuple[str, str]:
    return rules.choose(rules_policy(), rules.RuleInput(headers or {}, region, text, priority))


def test_rules_first_match_wins_then_default():
    assert decide("hi", {"x-tenant": "acme"}, region="eu", priority=1) == ("acme", "acme")
    assert decide("hi", region="eu", priority=1) == ("eu", "eu-critical")
    assert decide("hi", region="eu", priority=2) == ("small", "default")
    assert decide("x" * 400) == ("big", "long")  # 400 bytes ~ 100 tokens
    assert decide("please DEF parse(x): ...") == ("coder", "code")
    assert rules.estimate_tokens("é" * 2) == 1 and rules.estimate_tokens("") == 0


def test_normalised_votes():
    assert combine.normalise("  The Answer is: Paris.\n", "text") == "the answer is: paris"
    assert combine.normalise("It is 1,024 apples", "number") == "1024"
    assert combine.normalise("7 + 5 = 12.", "number") == "12"
    assert combine.normalise("4.50", "number") == "4.5"
    assert combine.normalise("no digits", "number") is None
    assert combine.normalise("\n\nParis!\nbecause", "first_line") == "paris"
    answers = [combine.MemberAnswer(0, "Paris."), combine.MemberAnswer(1, "Lyon"),
               combine.MemberAnswer(2, "paris"), combine.MemberAnswer(3, "Lyon", weight=5.0)]
    assert combine.combine(answers, "majority", "text").index == 0  # tie 2-2: the earliest
    assert combine.combine(answers, "weighted_vote", "text").index == 1  # 6 vs 2
    scored = [combine.MemberAnswer(0, "a", logprobs=(-1.0, -1.0)), combine.MemberAnswer(1, "b", logprobs=(-0.1,))]
    assert combine.combine(scored, "best_mean_logprob", "text").index == 1


def spec(**kw) -> records.Canary:
    c = records.parse(tp.TrafficPolicy(name="x", canary=tp.CanaryPolicy(
        stable="a", canary="b", steps=[5, 50], step_seconds=10, min_requests=10, **kw))).spec
    assert isinstance(c, records.Canary)
    return c


def side(requests: int, errors: int = 0, ttft_s: float = 0.02) -> tp.TargetWindow:
    counts = [0] * window.N_BUCKETS
    counts[window.bucket(ttft_s)] = requests
    return window.add([tp.TargetWindow(requests=requests, errors=errors, ttft_buckets=counts)])


def state(step: int = 0, since_ms: int = 0) -> tp.CanaryState:
    return tp.CanaryState(name="x", generation=1, phase=tp.CANARY_PHASE_PROGRESSING, step=step,
                          step_since_ms=since_ms)


def test_canary_rolls_back_on_errors_or_ttft_against_stable():
    s = spec()
    out = judge(s, state(), side(200, 2), side(20, 5), now_ms=1000)
    assert out.phase == tp.CANARY_PHASE_ROLLED_BACK and "error rate 25.0%" in out.reason
    slow = judge(s, state(), side(200, ttft_s=0.02), side(20, ttft_s=0.2), now_ms=1000)
    assert slow.phase == tp.CANARY_PHASE_ROLLED_BACK and "TTFT p95" in slow.reason
    assert "exceeds stable 20.0%" in regression(s, side(200, 40), side(20, 9))  # 45% vs 20%
    assert regression(spec(max_error_rate_increase=0.3), side(200, 40), side(20, 9)) == ""  # within 30 points
    assert regression(s, side(3), side(20, 1)) == ""  # 5% vs 0% (too few stable requests): not above 5 points


def test_canary_waits_then_steps_then_promotes():
    s = spec()
    assert "waiting for 10" in judge(s, state(), side(100), side(3), now_ms=60_000).reason
    healthy = judge(s, state(since_ms=55_000), side(100), side(20), now_ms=60_000)
    assert healthy.step == 0 and "healthy for 5s of 10s" in healthy.reason and not moved(state(), healthy)
    stepped = judge(s, state(since_ms=0), side(100), side(20), now_ms=60_000)
    assert stepped.step == 1 and stepped.step_since_ms == 60_000 and moved(state(), stepped)
    done = judge(s, state(step=1), side(10), side(100), now_ms=60_000)
    assert done.phase == tp.CANARY_PHASE_PROMOTED and "promoted" in done.reason
