"""`meshctl tenants|keys|audit`: who may call the public API, with which keys, and what
operators did. Every command needs an operator certificate (the control plane checks it)."""

from __future__ import annotations

import argparse
import datetime
import sys

from meshserve.v1 import auth_pb2 as ap
from meshserve.v1 import auth_pb2_grpc

from .ctl_common import EXIT_OK, channel, emit
from .tables import table


def stub(args) -> auth_pb2_grpc.AuthServiceStub:
    return auth_pb2_grpc.AuthServiceStub(channel(args))


def _when(ms: int) -> str:
    return datetime.datetime.fromtimestamp(ms / 1000, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def cmd_tenant_create(args) -> int:
    tenant = ap.Tenant(name=args.name, models=args.model or ["*"], requests_per_second=args.rps,
                       tokens_per_minute=args.tpm)
    stub(args).CreateTenant(ap.CreateTenantRequest(tenant=tenant, replace=args.replace),
                            timeout=args.timeout)
    print(f"tenant {args.name} may call: {', '.join(tenant.models)}; quotas: "
          f"{args.rps or 'unlimited'} requests/s, {args.tpm or 'unlimited'} tokens/min")
    return EXIT_OK


def cmd_tenant_list(args) -> int:
    reply = stub(args).ListTenants(ap.ListTenantsRequest(), timeout=args.timeout)
    return emit(args, reply, table(["TENANT", "MODELS", "REQ/S", "TOKENS/MIN", "CREATED"],
                                   [[t.name, ",".join(t.models), t.requests_per_second or "-",
                                     t.tokens_per_minute or "-", _when(t.created_unix_ms)]
                                    for t in reply.tenants]))


def cmd_tenant_delete(args) -> int:
    stub(args).DeleteTenant(ap.DeleteTenantRequest(name=args.name), timeout=args.timeout)
    print(f"tenant {args.name} deleted; its keys are revoked")
    return EXIT_OK


def cmd_key_create(args) -> int:
    reply = stub(args).CreateApiKey(ap.CreateApiKeyRequest(tenant=args.tenant), timeout=args.timeout)
    if args.output == "json":
        return emit(args, reply, "")
    print(reply.api_key)
    print(f"(key id {reply.key_id} for tenant {args.tenant}; shown once - only its hash is stored)",
          file=sys.stderr)
    return EXIT_OK


def cmd_key_list(args) -> int:
    reply = stub(args).ListApiKeys(ap.ListApiKeysRequest(tenant=args.tenant), timeout=args.timeout)
    return emit(args, reply, table(["KEY ID", "TENANT", "STATE", "CREATED", "BY"],
                                   [[k.key_id, k.tenant, "revoked" if k.revoked else "active",
                                     _when(k.created_unix_ms), k.created_by] for k in reply.keys]))


def cmd_key_revoke(args) -> int:
    stub(args).RevokeApiKey(ap.RevokeApiKeyRequest(key_id=args.key_id), timeout=args.timeout)
    print(f"key {args.key_id} revoked")
    return EXIT_OK


def cmd_audit(args) -> int:
    reply = stub(args).ListAuditEvents(ap.ListAuditEventsRequest(limit=args.limit), timeout=args.timeout)
    return emit(args, reply, table(["TIME (UTC)", "WHO", "ACTION", "OUTCOME", "DETAIL"],
                                   [[_when(e.time_unix_ms), e.who, e.action.rpartition("/")[2],
                                     e.outcome, e.detail[:80]] for e in reply.events]))


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tenants", help="tenants of the public API and the models they may call")
    t = p.add_subparsers(dest="tenants_command", required=True)
    q = t.add_parser("create")
    q.add_argument("name")
    q.add_argument("--model", action="append", default=[],
                   help="a model the tenant may call (repeatable; default '*' = every model)")
    q.add_argument("--rps", type=float, default=0.0, help="requests per second, whole mesh (0 = unlimited)")
    q.add_argument("--tpm", type=int, default=0,
                   help="prompt + completion tokens per minute, whole mesh (0 = unlimited)")
    q.add_argument("--replace", action="store_true", help="change an existing tenant (keys stay)")
    q.set_defaults(func=cmd_tenant_create)
    t.add_parser("list").set_defaults(func=cmd_tenant_list)
    q = t.add_parser("delete", help="delete a tenant and revoke its keys")
    q.add_argument("name")
    q.set_defaults(func=cmd_tenant_delete)
    p = sub.add_parser("keys", help="API keys (stored hashed; the key is printed once)")
    k = p.add_subparsers(dest="keys_command", required=True)
    q = k.add_parser("create")
    q.add_argument("tenant")
    q.set_defaults(func=cmd_key_create)
    q = k.add_parser("list")
    q.add_argument("--tenant", default="")
    q.set_defaults(func=cmd_key_list)
    q = k.add_parser("revoke")
    q.add_argument("key_id")
    q.set_defaults(func=cmd_key_revoke)
    p = sub.add_parser("audit", help="operator actions, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_audit)
