"""Who may call the operator API, and the audit log of what operators did.

Installed on the control plane's gRPC server after StatusInterceptor (so its errors become
statuses like any servicer's). With mTLS on:
- every AuthService method (tenants, keys, audit) and every ControlPlaneService, TrafficService
  and AutoscaleService method that changes something (all but List*/Get*/Explain*) needs an
  operator identity,
  `spiffe://meshserve.local/operator/<name>` in the client certificate; any other mesh identity
  gets PERMISSION_DENIED;
- reads (List*/Get*) of ControlPlaneService and TrafficService are open to every mesh identity.
With --insecure-dev there is no identity to check: every call passes (and is audited as
`insecure-dev`). Every changing call is audited, refused ones included: who, what, when, outcome.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import text_format
from meshserve.v1 import auth_pb2

from services.common.errors import PermissionDenied, ServiceError
from services.common.lifecycle import now_ms
from services.common.tls import describe_peer, peer_identity

GATED_SERVICES = ("meshserve.v1.ControlPlaneService", "meshserve.v1.TrafficService",
                  "meshserve.v1.AutoscaleService", "meshserve.v1.AuthService")
OPERATOR_ONLY_SERVICES = ("meshserve.v1.AuthService",)
MAX_DETAIL = 2000

Audit = Callable[[auth_pb2.AuditEvent], Awaitable[None]]


def is_change(method: str) -> bool:
    """'/pkg.Service/Method' changes state unless it is a List, Get or Explain."""
    name = method.rpartition("/")[2]
    return not name.startswith(("List", "Get", "Explain"))


def needs_operator(method: str) -> bool:
    service = method.strip("/").partition("/")[0]
    return service in OPERATOR_ONLY_SERVICES or (service in GATED_SERVICES and is_change(method))


def check_caller(context: Any, method: str, secure: bool) -> None:
    if not secure or not needs_operator(method):
        return
    ident = peer_identity(context)
    if ident is None or ident.kind != "operator":
        raise PermissionDenied(f"{method.rpartition('/')[2]} needs an operator identity; the caller "
                               f"is {describe_peer(context)} (use meshctl with an operator "
                               "certificate: `meshctl certs issue operator NAME`)")


def _detail(request: Any) -> str:
    try:
        text = text_format.MessageToString(request, as_one_line=True)
    except Exception:  # noqa: BLE001 - an undecodable request: StatusInterceptor answers it
        text = "<undecodable request>"
    return text[:MAX_DETAIL]


class OperatorGate(grpc.aio.ServerInterceptor):
    def __init__(self, secure: bool) -> None:
        self.secure = secure
        self.audit: Audit | None = None  # set once etcd is connected (server.py)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        gated = method.strip("/").partition("/")[0] in GATED_SERVICES
        if handler is None or handler.unary_unary is None or not gated:
            return handler
        behavior = handler.unary_unary

        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            outcome = "OK"
            try:
                check_caller(context, method, self.secure)
                return await behavior(request, context)
            except ServiceError as exc:
                outcome = exc.code.name
                raise
            except Exception:
                outcome = "INTERNAL"
                raise
            finally:
                if is_change(method) and self.audit is not None:
                    await self.audit(auth_pb2.AuditEvent(
                        time_unix_ms=now_ms(), who=describe_peer(context), action=method.strip("/"),
                        detail=_detail(request), outcome=outcome))

        return grpc.unary_unary_rpc_method_handler(call, handler.request_deserializer,
                                                   handler.response_serializer)
