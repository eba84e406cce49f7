"""`meshctl certs init|issue|list` (the mesh's local CA), and how meshctl finds its own identity.

meshctl talks to the control plane with mTLS as `operator` unless told `--insecure-dev`; its
certificate directory is `--certs`, else $MESHSERVE_CERTS, else `.meshserve/certs` (where
`meshserve up` puts them), so after `make run` every README command works unchanged.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from services.common import certs

from .ctl_common import DEFAULT_CERTS_DIR as DEFAULT_DIR
from .ctl_common import EXIT_OK
from .tables import table


def add_global_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--certs", default=os.environ.get("MESHSERVE_CERTS", ""), metavar="DIR",
                        help="certificate directory (env MESHSERVE_CERTS; default .meshserve/certs)")
    parser.add_argument("--cert-name", default=os.environ.get("MESHSERVE_CERT_NAME", "operator"),
                        help="which certificate meshctl presents (default operator)")
    parser.add_argument("--insecure-dev", action="store_true",
                        default=os.environ.get("MESHSERVE_INSECURE_DEV", "") == "1",
                        help="plaintext to the control plane (a mesh started with --insecure-dev)")


def cmd_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    existed = (directory / certs.CA_CERT).exists()
    path = certs.init_ca(directory, days=args.days)
    print(f"CA {'already in' if existed else 'created:'} {path}")
    return EXIT_OK


def cmd_issue(args: argparse.Namespace) -> int:
    hosts = tuple(h for h in args.host) or ("127.0.0.1", "localhost")
    path = certs.issue(Path(args.dir), args.kind, args.name, days=args.days, hosts=hosts)
    print(f"issued {path} for {certs.spiffe_id(args.kind, args.name)}")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    rows = [certs.describe(p) for p in sorted(Path(args.dir).glob("*.crt")) if p.name != certs.CA_CERT]
    print(table(["NAME", "IDENTITY", "NOT AFTER"],
                [[r["name"], r["identity"], r["not_after"]] for r in rows]))
    return EXIT_OK


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("certs", help="the mesh's local CA and component certificates")
    csub = p.add_subparsers(dest="certs_command", required=True)
    default_dir = os.environ.get("MESHSERVE_CERTS", str(DEFAULT_DIR))
    q = csub.add_parser("init", help="create the CA (kept if one exists)")
    q.add_argument("--dir", default=default_dir)
    q.add_argument("--days", type=int, default=3650)
    q.set_defaults(func=cmd_init)
    q = csub.add_parser("issue", help="issue (or re-issue: rotation) one component's certificate")
    q.add_argument("kind", choices=certs.KINDS)
    q.add_argument("name", help="the component's id, e.g. router0 or server-1")
    q.add_argument("--dir", default=default_dir)
    q.add_argument("--days", type=float, default=certs.DEFAULT_DAYS)
    q.add_argument("--host", action="append", default=[],
                   help="DNS name or IP the holder serves on (repeatable; default 127.0.0.1, localhost)")
    q.set_defaults(func=cmd_issue)
    q = csub.add_parser("list", help="certificates in the directory with identity and expiry")
    q.add_argument("--dir", default=default_dir)
    q.set_defaults(func=cmd_list)


def cmd_jwt_token(args: argparse.Namespace) -> int:
    from services.common import jwt_local

    print(jwt_local.token(Path(args.dir), args.tenant, ttl_s=args.ttl))
    return EXIT_OK


def add_jwt_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("jwt", help="the local mesh's development JWT issuer (Envoy checks its JWKS)")
    jsub = p.add_subparsers(dest="jwt_command", required=True)
    q = jsub.add_parser("token", help="print a signed token for a tenant (send as authorization: Bearer)")
    q.add_argument("tenant")
    q.add_argument("--ttl", type=int, default=3600, help="seconds until it expires")
    q.add_argument("--dir", default=os.environ.get("MESHSERVE_CERTS", str(DEFAULT_DIR)))
    q.set_defaults(func=cmd_jwt_token)
