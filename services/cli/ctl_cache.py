"""`meshctl cache stats|flush`: the shared cache as operators see it.

The control plane lists the servers; meshctl then asks each model server directly
(GetCacheStats / FlushCache), since cache figures live in the servers and the store, not in etcd.
"""

from __future__ import annotations

import json
import sys

import grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import modelserver_pb2 as pb
from meshserve.v1 import modelserver_pb2_grpc

from services.common import grpc_util

from .ctl_common import EXIT_OK, EXIT_REFUSED, controlplane, mib, resolve_tls, to_dict
from .tables import table


def _servers(args) -> list[cp.ServerStatus]:
    return list(controlplane(args).ListServers(cp.ListServersRequest(), timeout=args.timeout).servers)


def _stub(address: str, args) -> modelserver_pb2_grpc.ModelServerServiceStub:
    """A model server, dialled with meshctl's own certificate (or plaintext with --insecure-dev)."""
    if not hasattr(args, "tls"):
        args.tls = resolve_tls(args)
    return modelserver_pb2_grpc.ModelServerServiceStub(grpc_util.channel(address, options=[], tls=args.tls))


def _rate(hits: int, misses: int) -> str:
    return f"{100 * hits / (hits + misses):.1f}%" if hits + misses else "-"


def stats_text(answers: list[pb.GetCacheStatsResponse], failed: list[str]) -> str:
    rows: list[list[str]] = []
    store_lines: list[str] = []
    for a in answers:
        if a.store and not store_lines:
            state = "up" if a.store_up else "DOWN"
            store_lines.append(f"shared store {a.store}: {state}, {mib(a.store_used_bytes)} of "
                               f"{mib(a.store_max_bytes)}, {a.store_keys} keys, {a.store_evicted_keys} evicted")
        rows.extend([a.server_id, m.model, t.tier, _rate(t.hits, t.misses), str(t.hits), str(t.misses),
                     mib(t.bytes_read), mib(t.bytes_written), str(t.evictions), str(t.errors)]
                    for m in a.models for t in m.tiers)
    if not store_lines:
        store_lines.append("shared store: none configured")
    body = table(["SERVER", "MODEL", "TIER", "HIT RATE", "HITS", "MISSES", "READ", "WRITTEN", "EVICTED", "ERRORS"],
                 rows) if rows else "no cache figures yet"
    return "\n".join([*store_lines, body, *(f"!! {f}" for f in failed)])


def cmd_stats(args) -> int:
    answers, failed = [], []
    for s in _servers(args):
        try:
            answers.append(_stub(s.info.address, args).GetCacheStats(pb.GetCacheStatsRequest(), timeout=args.timeout))
        except grpc.RpcError as e:
            failed.append(f"{s.info.server_id}: {e.code().name}")
    if args.output == "json":
        print(json.dumps({"servers": [to_dict(a) for a in answers], "failed": failed}, indent=2))
    else:
        print(stats_text(answers, failed))
    return EXIT_OK if answers or not failed else EXIT_REFUSED


def cmd_flush(args) -> int:
    request = pb.FlushCacheRequest(model=args.model, tenant=args.tenant, shared=not args.local_only)
    local = shared = 0
    failed = []
    for s in _servers(args):
        if args.model and args.model not in s.info.models:
            continue
        try:
            resp = _stub(s.info.address, args).FlushCache(request, timeout=max(args.timeout, 60.0))
        except grpc.RpcError as e:
            failed.append(f"{s.info.server_id}: {e.code().name}: {e.details()}")
            continue
        local += resp.local_blocks
        shared += resp.shared_keys
    print(f"flushed {local} local KV blocks and {shared} shared store entries")
    for f in failed:
        print(f"!! {f}", file=sys.stderr)
    return EXIT_REFUSED if failed else EXIT_OK


def add_parsers(sub) -> None:
    p = sub.add_parser("cache", help="the shared cache: stats, flush")
    csub = p.add_subparsers(dest="cache_command", required=True)
    csub.add_parser("stats", help="hit rates, bytes and evictions per server, model and tier").set_defaults(
        func=cmd_stats)
    f = csub.add_parser("flush", help="drop cached KV blocks and answers")
    f.add_argument("--model", default="", help="only this model")
    f.add_argument("--tenant", default="", help="only this tenant's shared entries (local pools keep theirs)")
    f.add_argument("--local-only", action="store_true", help="only the servers' own pools, not the store")
    f.set_defaults(func=cmd_flush)
