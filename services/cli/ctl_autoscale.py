"""meshctl autoscale set|get|explain MODEL, autoscale budgets [set], autoscale backtest TRACE."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import grpc
from meshserve.v1 import autoscale_pb2 as asp
from meshserve.v1 import autoscale_pb2_grpc

from .ctl_common import EXIT_OK, EXIT_USAGE, age, emit
from .tables import table

#: flag -> (policy field, type); optional knobs (absent = the default).
KNOBS = {
    "target_utilization": float, "target_concurrency": float, "stable_window_s": float,
    "panic_window_pct": float, "panic_threshold": float, "tolerance": float,
    "max_scale_up_rate": float, "max_scale_down_rate": float, "scale_up_cooldown_s": float,
    "scale_down_cooldown_s": float, "zero_grace_s": float, "ttft_slo_ms": float, "kv_target": float,
    "bucket_s": float, "season_s": float,
}
SWITCHES = ("scale_to_zero", "predictive")


def _stub(args) -> autoscale_pb2_grpc.AutoscaleServiceStub:
    return autoscale_pb2_grpc.AutoscaleServiceStub(grpc.insecure_channel(args.controlplane))


def cmd_set(args) -> int:
    """Changes only what the flags name; the rest of the stored policy stays."""
    stub = _stub(args)
    try:
        current = stub.GetAutoscale(asp.GetAutoscaleRequest(model=args.model), timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:
            raise
        current = asp.GetAutoscaleResponse()  # the control plane says why when it is set
    record = asp.AutoscalePolicy()
    if current.configured:
        record.CopyFrom(current.stored)
    record.model = args.model
    record.enabled = not args.off
    if args.min is not None:
        record.min_replicas = args.min
    elif not current.configured:
        record.min_replicas = 0 if args.scale_to_zero == "on" else 1
    if args.max is not None:
        record.max_replicas = args.max
    for name in SWITCHES:
        value = getattr(args, name)
        if value is not None:
            setattr(record, name, value == "on")
    for name in KNOBS:
        value = getattr(args, name)
        if value is not None:
            setattr(record, name, value)
    for name in args.default or []:
        if name not in KNOBS:
            raise argparse.ArgumentTypeError(f"--default {name}: not a knob ({', '.join(KNOBS)})")
        record.ClearField(name)
    resp = stub.SetAutoscalePolicy(asp.SetAutoscalePolicyRequest(policy=record), timeout=args.timeout)
    p = resp.policy
    state = "on" if p.enabled else "off"
    return emit(args, resp, f"autoscaling {args.model}: {state}, {p.min_replicas}-{p.max_replicas} "
                            "replicas; `meshctl autoscale explain` shows why it has what it has")


def _policy_rows(p: asp.AutoscalePolicy) -> list[tuple[str, object]]:
    rows: list[tuple[str, object]] = [("enabled", "yes" if p.enabled else "no"),
                                      ("min_replicas", p.min_replicas),
                                      ("max_replicas", p.max_replicas),
                                      ("scale_to_zero", "yes" if p.scale_to_zero else "no"),
                                      ("predictive", "yes" if p.predictive else "no")]
    rows += [(name, f"{getattr(p, name):g}") for name in KNOBS]
    return rows


def cmd_get(args) -> int:
    resp = _stub(args).GetAutoscale(asp.GetAutoscaleRequest(model=args.model), timeout=args.timeout)
    s = resp.state
    rows = _policy_rows(resp.policy)
    rows += [("-- now", ""), ("ready / placed", f"{resp.ready_replicas} / {resp.placed_replicas}"),
             ("desired", s.desired_replicas if resp.policy.enabled else "- (off)"),
             ("last decision", f"{s.reason or '-'} ({age(s.decided_ms)} ago)"),
             ("limit", s.limit or "-"),
             ("time to READY", f"{s.ready_time_s:.1f}s over {s.ready_time_samples} load(s)")]
    note = "" if resp.configured else "\n(no policy set: autoscaling is off for this model)"
    return emit(args, resp, table(["SETTING", "VALUE"], rows) + note)


def _explain_text(e: asp.ExplainAutoscaleResponse) -> str:
    source = f"live numbers from {e.answered_by}" if e.live else \
        f"stored decision only (answered by {e.answered_by}; the leader's numbers were unavailable)"
    lines = [f"autoscale explain {e.model} ({source})",
             f"  replicas  desired {e.desired_replicas} (demand alone: {e.reactive_replicas}), "
             f"ready {e.ready_replicas}, placed {e.placed_replicas}, "
             f"min {e.policy.min_replicas}, max {e.policy.max_replicas}"]
    if e.live:
        lines += [
            f"  signals   demand {e.demand:.1f} now, {e.stable_demand:.1f} over {e.stable_window_s:g}s, "
            f"{e.panic_demand:.1f} over {e.panic_window_s:g}s; target {e.target_concurrency:.1f} per "
            f"replica; KV {e.kv_utilization:.0%}",
            f"            router queue {e.router_queued}, waiting for a replica "
            f"{e.waiting_for_replica}; {e.request_rate:.2f} req/s; TTFT p95 {e.ttft_p95_ms:.0f} ms; "
            f"{e.tokens_per_second:.0f} tok/s",
            f"  panic     {'yes' if e.panic else 'no'}",
            f"  forecast  {e.forecast_note or '-'}; floor {e.forecast_floor}; lead {e.lead_time_s:.1f}s; "
            f"{e.history_buckets} bucket(s) of history"]
    lines.append(f"  decision  {e.reason or '-'}" + (f"; limited by {e.limit}" if e.limit else ""))
    for d in e.recent:
        stamp = time.strftime("%H:%M:%S", time.localtime(d.at_ms / 1000))
        lines.append(f"  {stamp}  {d.from_replicas} -> {d.to_replicas}  {d.reason}"
                     + (f" [{d.limit}]" if d.limit else ""))
    return "\n".join(lines)


def cmd_explain(args) -> int:
    resp = _stub(args).ExplainAutoscale(asp.ExplainAutoscaleRequest(model=args.model),
                                        timeout=args.timeout)
    return emit(args, resp, _explain_text(resp))


UNITS = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10}


def _budget(text: str, memory: bool) -> tuple[str, str, int]:
    """'east/east-a=4' -> ('east', 'east-a', 4); '*' is the whole mesh; memory takes KiB..TiB."""
    scope, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected SCOPE=VALUE (SCOPE: '*', REGION or "
                                         "REGION/ZONE)")
    region, _, zone = ("" if scope == "*" else scope).partition("/")
    number, factor = value.strip().upper(), 1
    for unit, size in UNITS.items():
        if memory and number.endswith(unit):
            number, factor = number[:-len(unit)], size
            break
    try:
        return region, zone, int(float(number) * factor)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"{text!r}: {value!r} is not a number") from None


def cmd_budgets(args) -> int:
    stub = _stub(args)
    if args.action == "set":
        scopes: dict[tuple[str, str], asp.ScalingBudget] = {}
        for text in args.replicas or []:
            region, zone, n = _budget(text, memory=False)
            scopes.setdefault((region, zone), asp.ScalingBudget(region=region, zone=zone)).max_replicas = n
        for text in args.memory or []:
            region, zone, n = _budget(text, memory=True)
            scopes.setdefault((region, zone), asp.ScalingBudget(region=region, zone=zone)
                              ).max_memory_bytes = n
        record = asp.ScalingBudgets(budgets=list(scopes.values()))
        budgets = stub.SetScalingBudgets(asp.SetScalingBudgetsRequest(budgets=record),
                                         timeout=args.timeout).budgets
    else:
        budgets = stub.GetScalingBudgets(asp.GetScalingBudgetsRequest(), timeout=args.timeout).budgets
    rows = [(b.region or "*", b.zone or "*", b.max_replicas or "-",
             f"{b.max_memory_bytes / 2**30:g}GiB" if b.max_memory_bytes else "-") for b in budgets.budgets]
    return emit(args, budgets, table(["REGION", "ZONE", "MAX REPLICAS", "MAX MEMORY"], rows)
                if rows else "no scaling budgets")


def cmd_backtest(args) -> int:
    from services.controlplane.autoscaler.backtest import backtest, read_trace

    try:
        rates = read_trace(Path(args.trace))
        season = round(args.season / args.bucket)
        result = backtest(rates, season, round(args.lead / args.bucket), args.per_replica_rps,
                          args.min, args.max, args.bucket)
    except (OSError, ValueError, KeyError) as exc:
        print(f"meshctl autoscale backtest: {exc}")
        return EXIT_USAGE
    if args.steps:
        print(table(["BUCKET", "RATE", "FORECAST", "NEEDED", "REACTIVE", "WITH FLOOR"],
                    [(s.bucket, f"{s.actual:.2f}", f"{s.forecast:.2f}", s.needed, s.reactive,
                      s.predictive) for s in result.steps]))
    print(table(["", "REACTIVE ONLY", "WITH FORECAST FLOOR"], [
        ("replica-seconds", f"{result.reactive_replica_s:.0f}", f"{result.predictive_replica_s:.0f}"),
        ("buckets short of replicas", result.reactive_short, result.predictive_short)]))
    print(f"forecast over {result.buckets} bucket(s), {args.lead:g}s ahead: WAPE {result.wape:.1%}, "
          f"MAPE {result.mape:.1%}, RMSE {result.rmse:.2f} req/s")
    return EXIT_OK


def add_parsers(sub) -> None:
    p = sub.add_parser("autoscale", help="autoscaling: policies, decisions and why, budgets")
    asub = p.add_subparsers(dest="autoscale_command", required=True)
    s = asub.add_parser("set", help="set a model's autoscale policy (only the flags given change)")
    s.add_argument("model")
    s.add_argument("--min", type=int, help="fewest replicas while there is traffic")
    s.add_argument("--max", type=int, help="most replicas (required the first time)")
    s.add_argument("--off", action="store_true", help="turn autoscaling off (keeps the policy)")
    for name in SWITCHES:
        s.add_argument("--" + name.replace("_", "-"), dest=name, choices=["on", "off"])
    for name, kind in KNOBS.items():
        s.add_argument("--" + name.replace("_", "-"), dest=name, type=kind)
    s.add_argument("--default", action="append", metavar="KNOB", help="return a knob to its default")
    s.set_defaults(func=cmd_set)
    for name, func, text in (("get", cmd_get, "the policy with defaults, and the last decision"),
                             ("explain", cmd_explain, "signals, windows, forecast, the limit that "
                                                      "binds, recent decisions")):
        g = asub.add_parser(name, help=text)
        g.add_argument("model")
        g.set_defaults(func=func)
    b = asub.add_parser("budgets", help="per region/zone caps on replicas and memory")
    b.add_argument("action", nargs="?", default="get", choices=["get", "set"])
    b.add_argument("--replicas", action="append", metavar="SCOPE=N",
                   help="'*=20', 'east=8' or 'east/east-a=4' (set replaces every budget)")
    b.add_argument("--memory", action="append", metavar="SCOPE=BYTES", help="e.g. east=64GiB")
    b.set_defaults(func=cmd_budgets)
    t = asub.add_parser("backtest", help="replay a recorded request-rate trace through the forecast")
    t.add_argument("trace", help="CSV of `rate` or `time,rate` per bucket, or JSON {\"rates\": [...]}")
    t.add_argument("--bucket", type=float, default=60.0, help="seconds per trace row")
    t.add_argument("--season", type=float, default=86_400.0, help="seasonal period in seconds")
    t.add_argument("--lead", type=float, default=60.0, help="time a replica takes to become READY")
    t.add_argument("--per-replica-rps", type=float, required=True, help="requests/s one replica serves")
    t.add_argument("--min", type=int, default=1)
    t.add_argument("--max", type=int, default=1000)
    t.add_argument("--steps", action="store_true", help="print every bucket's decision")
    t.set_defaults(func=cmd_backtest)
