"""The operator's view of traffic policies: each record with the canary state routers apply and
any problem (a record routers ignore, a target that names nothing now). Plain functions."""

from __future__ import annotations

from meshserve.v1 import traffic_pb2 as tp

from services.common.errors import InvalidArgument
from services.common.membership import MeshView
from services.common.traffic import graph, records


def _problems(view: MeshView) -> dict[str, str]:
    parsed: dict[str, records.Policy] = {}
    problems: dict[str, str] = {}
    for name, msg in view.traffic_policies.items():
        try:
            policy = records.parse(msg)
        except InvalidArgument as exc:
            problems[name] = f"routers ignore this record: {exc.message}"
            continue
        if policy.name != name:
            problems[name] = f"routers ignore this record: it names policy {policy.name!r}"
            continue
        parsed[name] = policy
    for name in graph.cyclic(parsed):
        problems[name] = "routers ignore this record: it is part of a cycle or nests too deep"
    deployments = view.known_models()
    for name, policy in parsed.items():
        missing = graph.dangling(policy, parsed, deployments)
        if missing and name not in problems:
            problems[name] = f"target {', '.join(missing)} names nothing now (no READY replica will be found)"
        if name in deployments and name not in problems:
            problems[name] = f"a model server reports a model named {name!r}; this policy takes its place"
    return problems


def policy_status(view: MeshView, name: str, problems: dict[str, str] | None = None) -> tp.TrafficPolicyStatus:
    msg = view.traffic_policies.get(name)
    out = tp.TrafficPolicyStatus()
    if msg is None:
        return out
    out.policy.CopyFrom(msg)
    out.problem = (problems if problems is not None else _problems(view)).get(name, "")
    if msg.WhichOneof("kind") == "canary" and not out.problem:
        spec = records.parse(msg).spec
        assert isinstance(spec, records.Canary)
        state = view.canary_states.get(name)
        if state is not None and state.generation == msg.generation:
            out.canary.CopyFrom(state)
            out.canary_weight = records.canary_weight(spec, state.phase, state.step)
        else:
            out.canary_weight = spec.steps[0]
    return out


def list_status(view: MeshView, name: str = "") -> list[tp.TrafficPolicyStatus]:
    problems = _problems(view)
    return [policy_status(view, n, problems) for n in sorted(view.traffic_policies) if not name or n == name]
