"""The traffic executor without gRPC: a fake view of etcd and a fake deployment path, to check
resolution, availability, fallback (codes, first-token timeout, resume), ensembles and routes."""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from contextlib import aclosing

import pytest
from meshserve.v1 import common_pb2, inference_pb2
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import traffic_pb2 as tp

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.common.validation import SamplingParams, ValidRequest
from services.router.traffic.call import Call
from services.router.traffic.executor import TrafficExecutor
from services.router.traffic.stats import CanaryRecorder
from services.router.traffic.table import TrafficTable


class FakeView:
    def __init__(self, models: dict[str, int]) -> None:
        self.models = {m: cp.ModelSpec(name=m, created_ms=t) for m, t in models.items()}
        self.traffic_policies: dict[str, tp.TrafficPolicy] = {}
        self.canary_states: dict[str, tp.CanaryState] = {}
        self._listeners: list = []

    def known_models(self) -> set[str]:
        return set(self.models)

    def subscribe(self, listener) -> None:
        self._listeners.append(listener)

    def put(self, msg: tp.TrafficPolicy) -> None:
        self.traffic_policies[msg.name] = msg
        for f in self._listeners:
            f()


class FakeMesh:
    """Deployments by behaviour: 'ok' answers its own name, 'down' is UNAVAILABLE, 'busy' is
    RESOURCE_EXHAUSTED, 'bad' INVALID_ARGUMENT, 'slow' waits, 'breaks' fails after one token."""

    def __init__(self, behaviour: dict[str, str], ready: set[str] | None = None) -> None:
        self.behaviour = behaviour
        self.ready = set(behaviour) if ready is None else ready
        self.calls: list[ValidRequest] = []

    def candidates(self, model: str) -> list[object]:
        return [object()] if model in self.ready else []

    async def serve(self, req, deadline, metadata, observer):
        self.calls.append(req)
        how = self.behaviour.get(req.model, "down")
        if observer is not None:
            observer.attempt(how == "down")
        if how == "down":
            raise Unavailable(f"{req.model} is down")
        if how == "busy":
            raise ResourceExhausted(f"{req.model} is busy")
        if how == "bad":
            raise InvalidArgument("prompt too long")
        if how == "slow":
            await asyncio.sleep(30)
        words = (req.prompt or "").split() or [req.model]
        start = len(req.resume_token_ids)
        for i in range(start, req.sampling.max_tokens):
            chunk = inference_pb2.GenerateResponse(text=f"{req.model}:{words[i % len(words)]} ", token_ids=[i])
            chunk.served_by.deployment = req.model
            last = i + 1 == req.sampling.max_tokens
            if last:
                chunk.finish_reason = common_pb2.FINISH_REASON_LENGTH
                chunk.usage.completion_tokens = req.sampling.max_tokens
                chunk.usage.prompt_tokens = 1
            if observer is not None and i == start:
                observer.first_token(0.01)
            yield chunk
            if how == "breaks" and i == start:
                raise Unavailable("the stream broke")


def setup(behaviour: dict[str, str], *policies: tp.TrafficPolicy, ready: set[str] | None = None,
          versions: dict[str, int] | None = None):
    view = FakeView({**{m: 0 for m in behaviour}, **(versions or {})})
    for p in policies:
        view.put(p)
    mesh = FakeMesh(behaviour, ready)
    recorder = CanaryRecorder("r1")
    ex = TrafficExecutor(TrafficTable(view), mesh.serve, mesh.candidates, recorder, rng=random.Random(1))  # type: ignore[arg-type]
    return ex, mesh, view, recorder


def request(model: str, max_tokens: int = 2, **kw) -> ValidRequest:
    return ValidRequest(model=model, prompt="x", sampling=SamplingParams(max_tokens=max_tokens), **kw)


async def answer(ex: TrafficExecutor, req: ValidRequest,
                 call: Call | None = None) -> list[inference_pb2.GenerateResponse]:
    async with aclosing(ex.run(req, call or Call(None, None))) as chunks:
        return [c async for c in chunks]


def fallback(name: str, *links: str, **kw) -> tp.TrafficPolicy:
    return tp.TrafficPolicy(name=name, fallback=tp.FallbackPolicy(links=links, **kw))


async def test_fallback_moves_on_unavailable_busy_and_no_replica_and_says_which_link():
    ex, mesh, _, _ = setup({"gpu": "down", "gpu2": "busy", "idle": "ok", "cpu": "ok"},
                           fallback("m", "none", "gpu", "gpu2", "cpu"), ready={"gpu", "gpu2", "cpu"})
    chunks = await answer(ex, request("m"))
    assert [c.served_by.route for c in chunks] == ["m[fallback:3]>cpu"] * 2
    assert [r.model for r in mesh.calls] == ["gpu", "gpu2", "cpu"]


async def test_fallback_keeps_request_faults_and_reports_every_link():
    ex, _, _, _ = setup({"a": "bad", "b": "ok"}, fallback("m", "a", "b"))
    with pytest.raises(InvalidArgument):
        await answer(ex, request("m"))
    ex, _, _, _ = setup({"a": "down", "b": "busy"}, fallback("m", "a", "b"))
    with pytest.raises(ResourceExhausted, match="a: UNAVAILABLE.*b: RESOURCE_EXHAUSTED"):
        await answer(ex, request("m"))


async def test_fallback_first_token_timeout():
    ex, mesh, _, _ = setup({"hung": "slow", "cpu": "ok"}, fallback("m", "hung", "cpu", first_token_timeout_ms=50))
    chunks = await answer(ex, request("m"))
    assert chunks[-1].served_by.route == "m[fallback:1]>cpu"


async def test_broken_stream_resumes_on_the_next_link_only_when_allowed():
    ex, mesh, _, _ = setup({"a": "breaks", "b": "ok"}, fallback("m", "a", "b", resume_across_links=True))
    chunks = await answer(ex, request("m", max_tokens=4))
    assert [t for c in chunks for t in c.token_ids] == [0, 1, 2, 3]
    assert mesh.calls[-1].resume_token_ids == (0,)
    ex, _, _, _ = setup({"a": "breaks", "b": "ok"}, fallback("m", "a", "b"))
    with pytest.raises(Unavailable, match="broke"):
        await answer(ex, request("m", max_tokens=4))


async def test_split_sends_nothing_to_targets_without_ready_replicas():
    split = tp.TrafficPolicy(name="m", split=tp.SplitPolicy(targets=[
        tp.WeightedTarget(target="m@v1", weight=50), tp.WeightedTarget(target="m@v2", weight=50)]))
    ex, mesh, _, _ = setup({"m@v1": "ok", "m@v2": "ok"}, split, ready={"m@v1"})
    for _ in range(50):
        await answer(ex, request("m"))
    assert Counter(r.model for r in mesh.calls) == {"m@v1": 50}
    mesh.ready = set()
    with pytest.raises(Unavailable, match="no target of split 'm' has a ready replica"):
        await answer(ex, request("m"))


async def test_alias_goes_to_the_oldest_ready_version():
    ex, mesh, _, _ = setup({"m@v1": "ok", "m@v2": "ok"}, versions={"m@v1": 100, "m@v2": 200})
    assert ex.handles("m") and not ex.handles("m@v1")
    assert (await answer(ex, request("m")))[0].served_by.route == "m[alias]>m@v1"
    mesh.ready = {"m@v2"}
    assert (await answer(ex, request("m")))[0].served_by.route == "m[alias]>m@v2"


async def test_canary_weight_from_state_and_figures_per_side():
    canary = tp.TrafficPolicy(name="m", generation=7, canary=tp.CanaryPolicy(stable="m@v1", canary="m@v2",
                                                                             steps=[20, 100]))
    ex, mesh, view, recorder = setup({"m@v1": "ok", "m@v2": "ok"}, canary)
    for _ in range(400):
        await answer(ex, request("m"))
    share = Counter(r.model for r in mesh.calls)["m@v2"] / 400
    assert 0.14 < share < 0.26
    stats = recorder.snapshot("m")
    assert stats is not None and stats.generation == 7 and stats.canary.requests + stats.stable.requests == 400
    view.canary_states["m"] = tp.CanaryState(name="m", generation=7, phase=tp.CANARY_PHASE_ROLLED_BACK)
    mesh.calls.clear()
    for _ in range(50):
        await answer(ex, request("m"))
    assert {r.model for r in mesh.calls} == {"m@v1"}


def ensemble(combiner: tp.EnsembleCombiner, *targets: str, **kw) -> tp.TrafficPolicy:
    return tp.TrafficPolicy(name="e", ensemble=tp.EnsemblePolicy(
        combiner=combiner, members=[tp.EnsembleMember(target=t) for t in targets], **kw))


async def test_majority_vote_sums_usage_and_tolerates_failures_within_quorum():
    ex, mesh, _, _ = setup({"a": "ok", "b": "down", "c": "ok"},
                           ensemble(tp.ENSEMBLE_COMBINER_MAJORITY, "a", "b", "c", quorum=2))
    [chunk] = await answer(ex, request("e", request_id="r"))
    assert chunk.text == "a:x a:x " and chunk.usage.completion_tokens == 4
    assert chunk.served_by.route == "e[ensemble:0]>a"
    assert sorted(r.request_id for r in mesh.calls) == ["r.m0", "r.m1", "r.m2"]
    ex, _, _, _ = setup({"a": "ok", "b": "down", "c": "down"},
                        ensemble(tp.ENSEMBLE_COMBINER_MAJORITY, "a", "b", "c", quorum=2))
    with pytest.raises(Unavailable, match="1 of 3 members answered, quorum is 2"):
        await answer(ex, request("e"))


async def test_hedging_streams_the_first_member_to_answer():
    ex, mesh, _, _ = setup({"slow": "slow", "down": "down", "fast": "ok"},
                           ensemble(tp.ENSEMBLE_COMBINER_FIRST_SUCCESS, "slow", "down", "fast"))
    chunks = await answer(ex, request("e", max_tokens=3))
    assert "".join(c.text for c in chunks) == "fast:x fast:x fast:x "
    assert len(chunks) == 3


async def test_member_overrides_and_templates():
    policy = tp.TrafficPolicy(name="e", ensemble=tp.EnsemblePolicy(combiner=tp.ENSEMBLE_COMBINER_MAJORITY, members=[
        tp.EnsembleMember(target="a", temperature=0.7, seed=3, prompt_template="Q: {prompt}\nA:")]))
    ex, mesh, _, _ = setup({"a": "ok"}, policy)
    await answer(ex, request("e"))
    sent = mesh.calls[0]
    assert (sent.prompt, sent.sampling.temperature, sent.sampling.seed) == ("Q: x\nA:", pytest.approx(0.7), 3)
    with pytest.raises(InvalidArgument, match="cannot be resumed"):
        await answer(ex, request("e", max_tokens=3, resume_token_ids=(1,)))


async def test_rules_over_metadata_and_composition_with_a_split():
    rules = tp.TrafficPolicy(name="chat", rules=tp.RulesPolicy(default_target="small", rules=[
        tp.RoutingRule(name="acme", headers=[tp.HeaderMatch(name="x-tenant", values=["acme"])], target="big")]))
    big = tp.TrafficPolicy(name="big", split=tp.SplitPolicy(targets=[tp.WeightedTarget(target="big@v2", weight=100)]))
    ex, _, _, _ = setup({"small": "ok", "big@v2": "ok"}, rules, big)
    acme = await answer(ex, request("chat"), Call([("X-Tenant", b"acme")], None))
    assert acme[0].served_by.route == "chat[rule:acme]>big[split]>big@v2"
    other = await answer(ex, request("chat"), Call([("x-tenant", "else")], None))
    assert other[0].served_by.route == "chat[rule:default]>small"


async def test_a_router_ignores_a_cycle_written_around_the_control_plane():
    a = tp.TrafficPolicy(name="a", split=tp.SplitPolicy(targets=[tp.WeightedTarget(target="b", weight=100)]))
    b = tp.TrafficPolicy(name="b", split=tp.SplitPolicy(targets=[tp.WeightedTarget(target="a", weight=100)]))
    ok = tp.TrafficPolicy(name="c", split=tp.SplitPolicy(targets=[tp.WeightedTarget(target="m", weight=100)]))
    ex, _, _, _ = setup({"m": "ok"}, a, b, ok)
    assert not ex.handles("a") and ex.handles("c")
