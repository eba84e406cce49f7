"""`meshctl`: the operator's CLI for a MeshServe mesh.

Exit codes: 0 success, 1 the request was refused (e.g. unknown server), 2 bad usage,
3 the control plane or endpoint is unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import grpc
from google.protobuf.json_format import MessageToDict
from meshserve.v1 import controlplane_pb2, controlplane_pb2_grpc

from .tables import table

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def _to_dict(msg) -> dict:
    return MessageToDict(msg, preserving_proto_field_name=True)


def _state(s: controlplane_pb2.ServerStatus) -> str:
    return controlplane_pb2.ServingState.Name(s.state).removeprefix("SERVING_STATE_")


def _age(ms: int) -> str:
    if not ms:
        return "-"
    sec = max(0, int(time.time() - ms / 1000))
    return f"{sec // 3600}h{sec % 3600 // 60:02d}m" if sec >= 3600 else f"{sec // 60}m{sec % 60:02d}s"


def _servers_table(servers) -> str:
    rows = [(s.info.server_id, s.info.region, s.info.zone, _state(s), s.info.address,
             ",".join(s.info.models), s.info.backend + (" (simulated)" if s.info.simulated else ""),
             _age(s.info.started_at_ms)) for s in servers]
    return table(["SERVER", "REGION", "ZONE", "STATE", "ADDRESS", "MODELS", "BACKEND", "AGE"], rows)


def _cp(args) -> controlplane_pb2_grpc.ControlPlaneServiceStub:
    channel = grpc.insecure_channel(args.controlplane)
    return controlplane_pb2_grpc.ControlPlaneServiceStub(channel)


def cmd_status(args) -> int:
    resp = _cp(args).GetClusterStatus(controlplane_pb2.GetClusterStatusRequest(), timeout=args.timeout)
    if args.output == "json":
        print(json.dumps(_to_dict(resp), indent=2))
        return EXIT_OK
    print(f"control plane: {resp.controlplane_id} at {args.controlplane}")
    print(table(["ETCD", "HEALTHY", "VERSION", "LEADER", "ERROR"],
                [(m.endpoint, "yes" if m.healthy else "NO", m.version or "-",
                  "*" if m.is_leader else "", m.error) for m in resp.etcd]))
    print()
    print(_servers_table(sorted(resp.servers, key=lambda s: (s.info.region, s.info.zone,
                                                               s.info.server_id))))
    print()
    print(table(["MODEL", "REPLICAS"], sorted(resp.model_replicas.items())))
    print()
    print(table(["ROUTER", "REGION", "ADDRESS", "AGE"],
                [(r.replica_id, r.region, r.address, _age(r.started_at_ms)) for r in resp.routers]))
    return EXIT_OK


def cmd_servers(args) -> int:
    resp = _cp(args).ListServers(controlplane_pb2.ListServersRequest(region=args.region,
                                                                     model=args.model),
                                 timeout=args.timeout)
    print(json.dumps(_to_dict(resp), indent=2) if args.output == "json"
          else _servers_table(resp.servers))
    return EXIT_OK


def cmd_drain(args) -> int:
    resp = _cp(args).DrainServer(controlplane_pb2.DrainServerRequest(
        server_id=args.server, reason=args.reason), timeout=args.timeout)
    print(json.dumps(_to_dict(resp), indent=2) if args.output == "json"
          else f"server {args.server} is draining: new requests go elsewhere")
    return EXIT_OK


def cmd_undrain(args) -> int:
    resp = _cp(args).UndrainServer(controlplane_pb2.UndrainServerRequest(server_id=args.server),
                                   timeout=args.timeout)
    print(json.dumps(_to_dict(resp), indent=2) if args.output == "json"
          else f"server {args.server} takes new requests again")
    return EXIT_OK


def cmd_generate(args) -> int:
    from .inference_client import build_request, generate, generate_stream

    request = build_request(args.model, args.prompt, chat=not args.raw, max_tokens=args.max_tokens,
                            temperature=args.temperature, session_id=args.session,
                            region=args.region, priority=args.priority)
    if args.stream:
        last = None
        for chunk in generate_stream(args.endpoint, request, timeout=args.timeout):
            if args.output == "json":
                print(json.dumps(_to_dict(chunk)))
            else:
                print(chunk.text, end="", flush=True)
            last = chunk
        if args.output != "json":
            print()
            if last is not None:
                _footer(last)
        return EXIT_OK
    answer = generate(args.endpoint, request, timeout=args.timeout)
    if args.output == "json":
        print(json.dumps(_to_dict(answer), indent=2))
    else:
        print(answer.text)
        _footer(answer)
    return EXIT_OK


def _footer(answer) -> None:
    sb = answer.served_by
    sim = " SIMULATED" if sb.simulated else ""
    print(f"-- served by {sb.server_id} ({sb.region}/{sb.zone}, {sb.backend}{sim}) via "
          f"{sb.router_id}; tokens: {answer.usage.prompt_tokens} prompt, "
          f"{answer.usage.completion_tokens} completion, {answer.usage.cached_tokens} cached",
          file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="meshctl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--controlplane", default=os.environ.get("MESHCTL_CONTROLPLANE",
                                                                 "127.0.0.1:18010"),
                        help="control plane host:port (env MESHCTL_CONTROLPLANE)")
    parser.add_argument("--endpoint", default=os.environ.get("MESHCTL_ENDPOINT", "127.0.0.1:18000"),
                        help="public API (Envoy) host:port (env MESHCTL_ENDPOINT)")
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per call (default 10, 120 for generate)")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("status", help="the whole mesh on one screen").set_defaults(func=cmd_status)
    p = sub.add_parser("servers", help="list model servers")
    p.add_argument("--region", default="")
    p.add_argument("--model", default="")
    p.set_defaults(func=cmd_servers)
    p = sub.add_parser("drain", help="stop new traffic to a server")
    p.add_argument("server")
    p.add_argument("--reason", default="")
    p.set_defaults(func=cmd_drain)
    p = sub.add_parser("undrain", help="let a drained server take traffic again")
    p.add_argument("server")
    p.set_defaults(func=cmd_undrain)
    p = sub.add_parser("generate", help="send one request through the public endpoint")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--stream", action="store_true")
    p.add_argument("--raw", action="store_true", help="send as a raw prompt, not a chat message")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--session", default="")
    p.add_argument("--region", default="")
    p.add_argument("--priority", default="STANDARD", choices=["CRITICAL", "STANDARD", "SHEDDABLE"])
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout is None:
        args.timeout = 120.0 if args.command == "generate" else 10.0
    try:
        return args.func(args)
    except grpc.RpcError as exc:
        code = exc.code()
        if code in UNREACHABLE:
            target = args.endpoint if args.command == "generate" else args.controlplane
            print(f"meshctl: cannot reach {target} ({code.name}: {exc.details()}); is the mesh up? "
                  "(`make run`, or pass --controlplane/--endpoint)", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"meshctl: {code.name}: {exc.details()}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
