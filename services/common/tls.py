"""A process's TLS identity: which certificate files it presents and trusts, and who a peer is.

A process runs either secure (`--tls-dir DIR`, with `--tls-name` picking `<name>.crt/.key`, by
default its id) or, for development only, plaintext (`--insecure-dev`, which logs a loud
warning); with neither it refuses to start, so a forgotten flag never means plaintext.
Credentials are built from these files by `grpc_util` (the one place that makes them) and read
anew for every new listener handshake (server) and every new channel (client), so a certificate
replaced on disk is used without a restart.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .certs import CA_CERT, Identity, spiffe_id

log = logging.getLogger(__name__)

INSECURE_WARNING = ("*** --insecure-dev: PLAINTEXT gRPC and etcd, no client certificates. Anyone who "
                    "can reach these ports can read prompts and answers and change the mesh. "
                    "For development on one machine only. ***")


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    @classmethod
    def from_dir(cls, directory: str | Path, name: str) -> TlsFiles:
        d = Path(directory)
        files = cls(d / CA_CERT, d / f"{name}.crt", d / f"{name}.key")
        missing = [str(p) for p in (files.ca, files.cert, files.key) if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"TLS files missing: {', '.join(missing)} (make them with "
                                    f"`meshctl certs init` and `meshctl certs issue KIND {name}`)")
        return files

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(ca, cert chain, key) as PEM bytes, read now."""
        return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()

    def stamp(self) -> tuple[float, ...]:
        """Modification times: what changes when a certificate is rotated."""
        return tuple(os.stat(p).st_mtime_ns for p in (self.ca, self.cert, self.key))


def client_ssl_context(files: TlsFiles) -> ssl.SSLContext:
    """For the non-gRPC hops (NATS, Redis): trust only the mesh CA, check the server's name or IP,
    present this process's certificate. Read now, so a new connection uses a rotated pair."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-dir", default=os.environ.get("MESHSERVE_TLS_DIR", ""), metavar="DIR",
                   help="directory with ca.crt and NAME.crt/NAME.key (mTLS on every port and to "
                        "etcd; default $MESHSERVE_TLS_DIR)")
    p.add_argument("--tls-name", default="", metavar="NAME",
                   help="which certificate in --tls-dir (default: --id)")
    p.add_argument("--insecure-dev", action="store_true",
                   help="plaintext everywhere: development only, logs a loud warning")


def from_arguments(args: argparse.Namespace, default_name: str) -> TlsFiles | None:
    """The files `args` ask for, or None for --insecure-dev (warned about here)."""
    if args.insecure_dev:
        if args.tls_dir:
            raise ValueError("--insecure-dev and --tls-dir exclude each other")
        log.warning(INSECURE_WARNING)
        return None
    if not args.tls_dir:
        raise ValueError("no --tls-dir: MeshServe runs with mTLS (pass --tls-dir DIR, or "
                         "--insecure-dev for plaintext on a development machine)")
    return TlsFiles.from_dir(args.tls_dir, args.tls_name or default_name)


def identities(auth_context: dict[str, list[bytes]]) -> list[Identity]:
    """The mesh identities in a gRPC peer's auth context (its certificate's URI SANs)."""
    out = []
    for raw in auth_context.get("x509_subject_alternative_name", []):
        ident = Identity.parse(raw.decode(errors="replace"))
        if ident is not None:
            out.append(ident)
    return out


def peer_identity(context: Any) -> Identity | None:
    """The mesh identity of a gRPC call's peer (None: plaintext, or no mesh URI SAN)."""
    found = identities(context.auth_context())
    return found[0] if found else None


def describe_peer(context: Any) -> str:
    """Who called, for logs and audit records."""
    ident = peer_identity(context)
    if ident is not None:
        return spiffe_id(ident.kind, ident.name)
    return "insecure-dev" if context.auth_context().get("transport_security_type") is None else "unknown"
