"""What every meshctl command shares: stubs, output formats, exit codes."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc

from services.common import grpc_util
from services.common.tls import INSECURE_WARNING, TlsFiles

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3


def to_dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True)


def emit(args, msg, text: str) -> int:
    """Print JSON for scripts (-o json) or the table/text for people."""
    print(json.dumps(to_dict(msg), indent=2) if args.output == "json" else text)
    return EXIT_OK


DEFAULT_CERTS_DIR = Path(".meshserve") / "certs"


def resolve_tls(args) -> TlsFiles | None:
    """The files meshctl presents (read when a command first dials the control plane, so
    offline commands need none), or None for plaintext with --insecure-dev (warned about)."""
    if getattr(args, "insecure_dev", False):
        print(f"meshctl: {INSECURE_WARNING}", file=sys.stderr)
        return None
    return TlsFiles.from_dir(getattr(args, "certs", "") or DEFAULT_CERTS_DIR,
                             getattr(args, "cert_name", "operator"))


def channel(args) -> grpc.Channel:
    """A channel to the control plane with the operator's certificate (meshctl's --certs), or
    plaintext with --insecure-dev."""
    if not hasattr(args, "tls"):
        args.tls = resolve_tls(args)
    return grpc_util.channel(args.controlplane, options=[], tls=args.tls)


def controlplane(args) -> controlplane_pb2_grpc.ControlPlaneServiceStub:
    return controlplane_pb2_grpc.ControlPlaneServiceStub(channel(args))


def age(ms: int) -> str:
    if not ms:
        return "-"
    sec = max(0, int(time.time() - ms / 1000))
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


def serving_state(state: int) -> str:
    return cp.ServingState.Name(state).removeprefix("SERVING_STATE_")


def model_state(state: int) -> str:
    return cp.ModelState.Name(state).removeprefix("MODEL_STATE_").replace("UNSPECIFIED", "PLACED")


def mib(n: int) -> str:
    return f"{n / 2**20:.0f}MiB" if n else "-"
