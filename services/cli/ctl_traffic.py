"""meshctl commands about traffic policy: list, split, canary, fallback, apply (any policy from
JSON, e.g. rules and ensembles), delete, and promote / rollback / restart a canary."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import grpc
from google.protobuf.json_format import ParseDict
from meshserve.v1 import traffic_pb2 as tp
from meshserve.v1 import traffic_pb2_grpc

from .ctl_common import emit
from .tables import table


def stub(args) -> traffic_pb2_grpc.TrafficServiceStub:
    return traffic_pb2_grpc.TrafficServiceStub(grpc.insecure_channel(args.controlplane))


def _targets(p: tp.TrafficPolicy) -> str:
    kind = p.WhichOneof("kind")
    if kind == "split":
        return ", ".join(f"{t.target}={t.weight}" for t in p.split.targets)
    if kind == "canary":
        return f"{p.canary.stable} -> {p.canary.canary} steps {','.join(map(str, p.canary.steps)) or '5,25,50,100'}"
    if kind == "fallback":
        return " > ".join(p.fallback.links)
    if kind == "rules":
        rules = [f"{r.name or i}->{r.target}" for i, r in enumerate(p.rules.rules)]
        return ", ".join([*rules, f"default->{p.rules.default_target}"])
    if kind == "ensemble":
        combiner = tp.EnsembleCombiner.Name(p.ensemble.combiner).removeprefix("ENSEMBLE_COMBINER_")
        return f"{combiner.lower()} of " + ", ".join(m.target for m in p.ensemble.members)
    return "-"


def _canary(s: tp.TrafficPolicyStatus) -> str:
    if s.policy.WhichOneof("kind") != "canary" or s.problem:
        return "-"
    if not s.HasField("canary"):
        return f"{s.canary_weight}% (step 1, not judged yet)"
    phase = tp.CanaryPhase.Name(s.canary.phase).removeprefix("CANARY_PHASE_")
    return f"{s.canary_weight}% {phase} step {s.canary.step + 1}"


def policies_table(statuses) -> str:
    return table(["POLICY", "KIND", "TARGETS", "CANARY", "WHY / PROBLEM"],
                 [(s.policy.name, s.policy.WhichOneof("kind") or "-", _targets(s.policy), _canary(s),
                   ("!! " + s.problem) if s.problem else (s.canary.reason if s.HasField("canary") else ""))
                  for s in statuses])


def status_section(args) -> str:
    """The TRAFFIC table of `meshctl status` ('' when the control plane has no TrafficService)."""
    try:
        resp = stub(args).ListTrafficPolicies(tp.ListTrafficPoliciesRequest(), timeout=args.timeout)
    except grpc.RpcError:
        return ""
    return policies_table(resp.policies) if resp.policies else ""


def cmd_list(args) -> int:
    resp = stub(args).ListTrafficPolicies(tp.ListTrafficPoliciesRequest(name=args.name), timeout=args.timeout)
    return emit(args, resp, policies_table(resp.policies) if resp.policies else "no traffic policies")


def _set(args, policy: tp.TrafficPolicy) -> int:
    resp = stub(args).SetTrafficPolicy(tp.SetTrafficPolicyRequest(policy=policy), timeout=args.timeout)
    return emit(args, resp, f"traffic policy {resp.policy.name} ({resp.policy.WhichOneof('kind')}) written, "
                            f"generation {resp.policy.generation}")


def _weighted(text: str) -> tp.WeightedTarget:
    target, sep, weight = text.rpartition("=")
    if not sep or not weight.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write TARGET=PERCENT, e.g. smollm2@v2=10")
    return tp.WeightedTarget(target=target, weight=int(weight))


def cmd_split(args) -> int:
    policy = tp.TrafficPolicy(name=args.name, description=args.description)
    policy.split.targets.extend(_weighted(t) for t in args.targets)
    return _set(args, policy)


def cmd_canary(args) -> int:
    try:
        steps = [int(s) for s in args.steps.split(",")] if args.steps else []
    except ValueError:
        raise argparse.ArgumentTypeError(f"--steps {args.steps!r}: comma-separated percents") from None
    policy = tp.TrafficPolicy(name=args.name, description=args.description, canary=tp.CanaryPolicy(
        stable=args.stable, canary=args.canary, steps=steps, step_seconds=args.step_seconds,
        max_error_rate_increase=args.max_error_increase, max_ttft_p95_increase=args.max_ttft_increase,
        min_requests=args.min_requests, window_seconds=args.window_seconds))
    return _set(args, policy)


def cmd_fallback(args) -> int:
    policy = tp.TrafficPolicy(name=args.name, description=args.description, fallback=tp.FallbackPolicy(
        links=args.links, first_token_timeout_ms=args.first_token_timeout_ms,
        resume_across_links=args.resume_across_links))
    return _set(args, policy)


def cmd_apply(args) -> int:
    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
        policy = ParseDict(json.loads(text), tp.TrafficPolicy())
    except (OSError, ValueError) as exc:  # json and protobuf parse errors are ValueErrors
        raise argparse.ArgumentTypeError(f"{args.file}: not a TrafficPolicy in JSON ({exc})") from None
    return _set(args, policy)


def cmd_delete(args) -> int:
    stub(args).DeleteTrafficPolicy(tp.DeleteTrafficPolicyRequest(name=args.name), timeout=args.timeout)
    print(f"traffic policy {args.name} deleted")
    return 0


def cmd_control(args) -> int:
    action = {"promote": tp.CANARY_ACTION_PROMOTE, "rollback": tp.CANARY_ACTION_ROLLBACK,
              "restart": tp.CANARY_ACTION_RESTART}[args.traffic_command]
    resp = stub(args).ControlCanary(tp.ControlCanaryRequest(name=args.name, action=action, reason=args.reason),
                                    timeout=args.timeout)
    return emit(args, resp, policies_table([resp.status]))


def add_parsers(sub) -> None:
    p = sub.add_parser("traffic", help="traffic policies: versions, splits, canaries, fallbacks, rules, ensembles")
    ts = p.add_subparsers(dest="traffic_command", required=True)
    q = ts.add_parser("list", help="policies, canary steps and why")
    q.add_argument("name", nargs="?", default="")
    q.set_defaults(func=cmd_list)
    q = ts.add_parser("split", help="NAME TARGET=PERCENT ... (percents add up to 100)")
    q.add_argument("name")
    q.add_argument("targets", nargs="+")
    q.set_defaults(func=cmd_split)
    q = ts.add_parser("canary", help="step-wise canary with automatic rollback")
    q.add_argument("name")
    q.add_argument("--stable", required=True)
    q.add_argument("--canary", required=True)
    q.add_argument("--steps", default="", help="canary percents, e.g. 5,25,100 (default 5,25,50,100)")
    q.add_argument("--step-seconds", type=int, default=0, help="healthy time per step (default 60)")
    q.add_argument("--max-error-increase", type=float, default=0.0, help="fraction, default 0.05")
    q.add_argument("--max-ttft-increase", type=float, default=0.0, help="fraction of TTFT p95, default 0.5")
    q.add_argument("--min-requests", type=int, default=0, help="per side and window, default 20")
    q.add_argument("--window-seconds", type=int, default=0, help="default 30")
    q.set_defaults(func=cmd_canary)
    q = ts.add_parser("fallback", help="NAME PRIMARY FALLBACK ...")
    q.add_argument("name")
    q.add_argument("links", nargs="+")
    q.add_argument("--first-token-timeout-ms", type=int, default=0)
    q.add_argument("--resume-across-links", action="store_true",
                   help="links serve the same weights: a broken stream continues on the next link")
    q.set_defaults(func=cmd_fallback)
    for kind in ("split", "canary", "fallback"):
        ts.choices[kind].add_argument("--description", default="")
    q = ts.add_parser("apply", help="any policy as JSON (TrafficPolicy), e.g. rules or an ensemble")
    q.add_argument("-f", "--file", required=True, help="a JSON file, or - for standard input")
    q.set_defaults(func=cmd_apply)
    q = ts.add_parser("delete")
    q.add_argument("name")
    q.set_defaults(func=cmd_delete)
    for action in ("promote", "rollback", "restart"):
        q = ts.add_parser(action, help=f"{action} a canary now")
        q.add_argument("name")
        q.add_argument("--reason", default="")
        q.set_defaults(func=cmd_control)
