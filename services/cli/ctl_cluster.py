"""meshctl commands about servers and the cluster: status, servers, drain, undrain, leader."""

from __future__ import annotations

from meshserve.v1 import controlplane_pb2 as cp

from .ctl_common import age, controlplane, emit, mib, model_state, serving_state
from .ctl_models import deployment_note
from .ctl_traffic import status_section
from .tables import table


def servers_table(servers) -> str:
    rows = []
    for s in servers:
        models = ",".join(f"{m.model}:{model_state(m.state)}" for m in s.models) or "-"
        load = (f"{s.load.running}/{s.load.max_running} run, {s.load.queue_depth} q, "
                f"kv {s.load.kv_blocks_used}/{s.load.kv_blocks_total}") if s.HasField("load") else "-"
        rows.append((s.info.server_id, s.info.region, s.info.zone, serving_state(s.state),
                     s.info.address, models, load, mib(s.info.memory_bytes), _backends(s),
                     ",".join(f"{k}={v}" for k, v in sorted(s.info.labels.items())) or "-",
                     age(s.info.started_at_ms), s.health_reason))
    return table(["SERVER", "REGION", "ZONE", "STATE", "ADDRESS", "MODELS", "LOAD", "MEMORY",
                  "BACKEND", "LABELS", "AGE", "HEALTH NOTE"], rows)


def _backends(s) -> str:
    """Per model replica (ModelStatus); older servers only fill the server-wide summary."""
    kinds = sorted({m.backend + (" (sim)" if m.simulated else "") for m in s.models if m.backend})
    return ",".join(kinds) or (s.info.backend + (" (sim)" if s.info.simulated else ""))


def cmd_status(args) -> int:
    resp = controlplane(args).GetClusterStatus(cp.GetClusterStatusRequest(), timeout=args.timeout)
    if args.output == "json":
        return emit(args, resp, "")
    leader = resp.leader.replica_id or ("UNKNOWN" if resp.degraded
                                        else "NONE (election in progress?)")
    head = f"control plane {resp.controlplane_id} at {args.controlplane}; leader: {leader}"
    if resp.degraded:
        head += (f"\n!! DEGRADED: {resp.degraded_reason or 'etcd is unreachable'}; showing the "
                 "last known state")
    parts = [
        head,
        table(["ETCD", "HEALTHY", "VERSION", "LEADER", "ERROR"],
              [(m.endpoint, "yes" if m.healthy else "NO", m.version or "-",
                "*" if m.is_leader else "", m.error) for m in resp.etcd]),
        servers_table(sorted(resp.servers, key=lambda s: (s.info.region, s.info.zone,
                                                          s.info.server_id))),
        table(["MODEL", "WANTED", "PLACED", "READY", "BACKEND", "NOTE"],
              [(d.spec.name, d.spec.replicas, d.placed_replicas, d.ready_replicas, d.spec.backend,
                deployment_note(d)) for d in resp.deployments]
              + [(m, "pinned", "-", n, "-", "") for m, n in sorted(resp.model_replicas.items())
                 if m not in {d.spec.name for d in resp.deployments}]),
        table(["ROUTER", "REGION", "ADDRESS", "AGE"],
              [(r.replica_id, r.region, r.address, age(r.started_at_ms)) for r in resp.routers]),
        table(["CONTROL PLANE", "ADDRESS", "LEADER", "AGE"],
              [(c.replica_id, c.address, "*" if c.replica_id == resp.leader.replica_id else "",
                age(c.started_at_ms)) for c in resp.controlplanes]),
        status_section(args),
    ]
    print("\n\n".join(p for p in parts if p))
    return 0


def cmd_servers(args) -> int:
    request = cp.ListServersRequest(region=args.region, model=args.model)
    for label in args.label:
        key, _, value = label.partition("=")
        request.labels[key] = value
    resp = controlplane(args).ListServers(request, timeout=args.timeout)
    return emit(args, resp, servers_table(resp.servers))


def cmd_drain(args) -> int:
    resp = controlplane(args).DrainServer(cp.DrainServerRequest(
        server_id=args.server, reason=args.reason, wait_seconds=args.wait), timeout=args.timeout)
    return emit(args, resp, f"server {args.server} is draining: new requests go elsewhere; its "
                            "models move once in-flight requests finish")


def cmd_undrain(args) -> int:
    resp = controlplane(args).UndrainServer(cp.UndrainServerRequest(server_id=args.server),
                                            timeout=args.timeout)
    return emit(args, resp, f"server {args.server} takes new requests again")


def cmd_leader(args) -> int:
    resp = controlplane(args).GetLeader(cp.GetLeaderRequest(), timeout=args.timeout)
    return emit(args, resp, f"{resp.leader.replica_id} at {resp.leader.address}, leading for "
                            f"{age(resp.leader.since_ms)} (answered by {resp.answered_by})")


def add_parsers(sub) -> None:
    sub.add_parser("status", help="the whole mesh on one screen").set_defaults(func=cmd_status)
    p = sub.add_parser("servers", help="list model servers")
    p.add_argument("--region", default="")
    p.add_argument("--model", default="")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                   help="only servers with this label (repeatable: all must match)")
    p.set_defaults(func=cmd_servers)
    p = sub.add_parser("drain", help="stop new traffic to a server, then move its models")
    p.add_argument("server")
    p.add_argument("--reason", default="")
    p.add_argument("--wait", type=int, default=0,
                   help="seconds to wait for in-flight requests before moving models (default 30)")
    p.set_defaults(func=cmd_drain)
    p = sub.add_parser("undrain", help="let a drained server take traffic again")
    p.add_argument("server")
    p.set_defaults(func=cmd_undrain)
    sub.add_parser("leader", help="which control-plane replica leads").set_defaults(func=cmd_leader)
