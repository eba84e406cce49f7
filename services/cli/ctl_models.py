"""meshctl commands about models: models, model deploy|scale|undeploy|retry|options, placement,
policy."""

from __future__ import annotations

import argparse

from meshserve.v1 import controlplane_pb2 as cp

from .ctl_common import controlplane, emit, mib, model_state
from .tables import table


def _regions(items: list[str]) -> list[cp.RegionRequirement]:
    """['us=1', 'eu'] -> requirements (a bare region means minimum 0: allowed, not required)."""
    out = []
    for item in items:
        name, _, n = item.partition("=")
        if n and not n.lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--region {item!r}: expected REGION or REGION=MIN")
        out.append(cp.RegionRequirement(region=name, min_replicas=int(n or 0)))
    return out


def deployment_note(d) -> str:
    """What `models` and `status` say about a deployment: why it is short, halted or failing."""
    if d.unsatisfied_reason:
        return d.unsatisfied_reason
    if d.failures:
        return "load failed on " + ", ".join(f"{f.server_id} ({f.reason})" for f in d.failures)
    return ""


def _deployments_table(deployments) -> str:
    return table(["MODEL", "BACKEND", "SOURCE", "WANTED", "PLACED", "READY", "REGIONS", "MEMORY",
                  "NOTE"],
                 [(d.spec.name, d.spec.backend, d.spec.source or "-", d.spec.replicas,
                   d.placed_replicas, d.ready_replicas,
                   ",".join(f"{r.region}>={r.min_replicas}" for r in d.spec.regions) or "any",
                   mib(d.spec.memory_bytes), deployment_note(d)) for d in deployments])


def cmd_models(args) -> int:
    resp = controlplane(args).ListDeployments(cp.ListDeploymentsRequest(), timeout=args.timeout)
    return emit(args, resp, _deployments_table(resp.deployments))


def cmd_deploy(args) -> int:
    spec = cp.ModelSpec(name=args.name, backend=args.backend, source=args.source,
                        replicas=args.replicas, memory_bytes=args.memory_bytes,
                        regions=_regions(args.region))
    for option in args.option:
        key, sep, value = option.partition("=")
        if not sep or not key.strip():
            raise argparse.ArgumentTypeError(f"--option {option!r} is not key=value (see `meshctl "
                                             f"model options {args.backend}`)")
        spec.options[key.strip()] = value
    resp = controlplane(args).DeployModel(cp.DeployModelRequest(spec=spec), timeout=args.timeout)
    return emit(args, resp, f"deployed {args.name}: {args.replicas} replica(s) wanted; "
                            "`meshctl models` shows progress")


def cmd_scale(args) -> int:
    resp = controlplane(args).ScaleModel(cp.ScaleModelRequest(
        name=args.name, replicas=args.replicas, regions=_regions(args.region)), timeout=args.timeout)
    return emit(args, resp, f"{args.name} scaled to {args.replicas} replica(s)")


def cmd_undeploy(args) -> int:
    resp = controlplane(args).UndeployModel(cp.UndeployModelRequest(name=args.name),
                                            timeout=args.timeout)
    return emit(args, resp, f"{args.name} undeployed; its replicas unload")


def cmd_retry(args) -> int:
    resp = controlplane(args).RetryModel(cp.RetryModelRequest(name=args.name), timeout=args.timeout)
    return emit(args, resp, f"{args.name}: halt lifted, every placement loads again (generation "
                            f"{resp.deployment.spec.generation}); `meshctl models` shows progress")


def cmd_options(args) -> int:
    from services.modelserver.engine import options

    for backend in [args.backend] if args.backend else options.BACKENDS:
        print(f"{backend}:\n{options.describe(backend)}")
    return 0


def cmd_placement(args) -> int:
    resp = controlplane(args).ListPlacements(cp.ListPlacementsRequest(model=args.model),
                                             timeout=args.timeout)
    return emit(args, resp, table(
        ["MODEL", "SERVER", "REGION", "ZONE", "STATE", "MANAGED", "REASON"],
        [(p.model, p.server_id, p.region, p.zone, model_state(p.state),
          "yes" if p.managed else "pinned", p.reason) for p in resp.placements]))


def cmd_policy(args) -> int:
    stub = controlplane(args)
    if args.action == "get":
        resp = stub.GetRoutingPolicy(cp.GetRoutingPolicyRequest(), timeout=args.timeout)
    else:
        policy = stub.GetRoutingPolicy(cp.GetRoutingPolicyRequest(), timeout=args.timeout).policy
        for name in ("session_header", "affinity_load_bound", "spill_utilization"):
            value = getattr(args, name)
            if value is not None:
                setattr(policy, name, value)
        for name in ("prefer_region", "prefer_zone"):
            value = getattr(args, name)
            if value is not None:
                setattr(policy, name, value == "on")
        resp = stub.SetRoutingPolicy(cp.SetRoutingPolicyRequest(policy=policy), timeout=args.timeout)
    p = resp.policy
    return emit(args, resp, table(["SETTING", "VALUE"], [
        ("session_header", p.session_header or "(none)"),
        ("affinity_load_bound", p.affinity_load_bound or "default"),
        ("prefer_region", "on" if p.prefer_region else "off"),
        ("prefer_zone", "on" if p.prefer_zone else "off"),
        ("spill_utilization", p.spill_utilization or "default")]))


def add_parsers(sub) -> None:
    sub.add_parser("models", help="deployed models and their replicas").set_defaults(func=cmd_models)
    model = sub.add_parser("model", help="deploy, scale or undeploy a model")
    msub = model.add_subparsers(dest="model_command", required=True)
    p = msub.add_parser("deploy", help="deploy a model")
    p.add_argument("name")
    p.add_argument("--backend", default="torch", help="sim, torch or tensorrt_llm")
    p.add_argument("--source", default="embedded",
                   help="'embedded' (the packaged SmolLM2, torch only), or a .gguf file or Hugging "
                        "Face folder given relative to the servers' --model-dir directories (no "
                        "absolute path, no '..')")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--region", action="append", default=[], help="REGION[=MIN] (repeatable)")
    p.add_argument("--memory-bytes", type=int, default=0, help="memory one replica needs")
    p.add_argument("--option", action="append", default=[],
                   help="engine option key=value (repeatable; `meshctl model options` lists them); "
                        "unknown options and bad values are refused")
    p.set_defaults(func=cmd_deploy)
    p = msub.add_parser("scale", help="change a model's replica count")
    p.add_argument("name")
    p.add_argument("--replicas", type=int, required=True)
    p.add_argument("--region", action="append", default=[], help="REGION[=MIN] (replaces all)")
    p.set_defaults(func=cmd_scale)
    p = msub.add_parser("undeploy", help="remove a model")
    p.add_argument("name")
    p.set_defaults(func=cmd_undeploy)
    p = msub.add_parser("retry", help="lift a placement halt and load the model again everywhere",
                        description="After a model failed to load on --halt-after-failures "
                        "servers the leader stops placing it (`meshctl models` says HALTED and "
                        "why). Fix the cause (e.g. put the file in the servers' model "
                        "directories), then retry: a new load generation, loaded again wherever "
                        "it is placed. Undeploying and deploying again also starts afresh.")
    p.add_argument("name")
    p.set_defaults(func=cmd_retry)
    p = msub.add_parser("options", help="the engine options each backend accepts")
    p.add_argument("backend", nargs="?", default="", choices=["", "sim", "torch", "tensorrt_llm"])
    p.set_defaults(func=cmd_options)
    p = sub.add_parser("placement", help="which server holds which model")
    p.add_argument("--model", default="")
    p.set_defaults(func=cmd_placement)
    p = sub.add_parser("policy", help="routing policy (session affinity, locality)")
    p.add_argument("action", choices=["get", "set"])
    p.add_argument("--session-header", dest="session_header")
    p.add_argument("--affinity-load-bound", dest="affinity_load_bound", type=float)
    p.add_argument("--spill-utilization", dest="spill_utilization", type=float)
    p.add_argument("--prefer-region", dest="prefer_region", choices=["on", "off"])
    p.add_argument("--prefer-zone", dest="prefer_zone", choices=["on", "off"])
    p.set_defaults(func=cmd_policy)
