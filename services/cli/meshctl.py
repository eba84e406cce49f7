"""`meshctl`: the operator's CLI for a MeshServe mesh.

Exit codes: 0 success, 1 the request was refused (e.g. unknown server), 2 bad usage,
3 the control plane or endpoint is unreachable.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from . import ctl_auth, ctl_autoscale, ctl_cache, ctl_certs, ctl_cluster, ctl_jobs, ctl_models, ctl_traffic
from .ctl_common import EXIT_OK, EXIT_REFUSED, EXIT_UNREACHABLE, EXIT_USAGE, to_dict

UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


def cmd_generate(args) -> int:
    from .inference_client import build_request, generate, generate_stream

    request = build_request(args.model, args.prompt, chat=not args.raw, max_tokens=args.max_tokens,
                            temperature=args.temperature, session_id=args.session,
                            region=args.region, priority=args.priority)
    if args.stream:
        last = None
        for chunk in generate_stream(args.endpoint, request, timeout=args.timeout, api_key=args.api_key):
            if args.output == "json":
                print(json.dumps(to_dict(chunk)))
            else:
                print(chunk.text, end="", flush=True)
            last = chunk
        if args.output != "json":
            print(flush=True)
            if last is not None:
                _footer(last)
        return EXIT_OK
    answer = generate(args.endpoint, request, timeout=args.timeout, api_key=args.api_key)
    if args.output == "json":
        print(json.dumps(to_dict(answer), indent=2))
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
    ctl_certs.add_global_arguments(parser)
    parser.add_argument("-o", "--output", choices=["table", "json"], default="table")
    parser.add_argument("--timeout", type=float, default=None,
                        help="seconds per call (default 10, 120 for generate)")
    sub = parser.add_subparsers(dest="command", required=True)
    ctl_cluster.add_parsers(sub)
    ctl_models.add_parsers(sub)
    ctl_traffic.add_parsers(sub)
    ctl_certs.add_parsers(sub)
    ctl_certs.add_jwt_parser(sub)
    ctl_auth.add_parsers(sub)
    ctl_autoscale.add_parsers(sub)
    ctl_jobs.add_parsers(sub)
    ctl_cache.add_parsers(sub)
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
    p.add_argument("--api-key", default=os.environ.get("MESHSERVE_API_KEY", ""),
                   help="the tenant's API key (env MESHSERVE_API_KEY; `meshctl keys create`)")
    p.set_defaults(func=cmd_generate)  # the public edge: plaintext by configuration
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout is None:
        args.timeout = 120.0 if args.command == "generate" else 10.0
    try:
        return args.func(args)
    except FileNotFoundError as exc:  # no certificate where --certs points
        print(f"meshctl: {exc}; pass --certs DIR (or --insecure-dev for a plaintext mesh)",
              file=sys.stderr)
        return EXIT_USAGE
    except argparse.ArgumentTypeError as exc:
        print(f"meshctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except grpc.RpcError as exc:
        code = exc.code()
        if code in UNREACHABLE:
            target = args.endpoint if args.command in ("generate", "jobs", "batch") else args.controlplane
            print(f"meshctl: cannot reach {target} ({code.name}: {exc.details()}); is the mesh up? "
                  "(`make run`, or pass --controlplane/--endpoint)", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"meshctl: {code.name}: {exc.details()}", file=sys.stderr)
        return EXIT_REFUSED


if __name__ == "__main__":
    sys.exit(main())
