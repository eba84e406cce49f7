"""Who is calling a router, and may they call this model.

With mTLS on (the router has a certificate), a caller is known by its client certificate:
- Envoy (`spiffe://meshserve.local/envoy/...`) forwards a client of the public API. Envoy removed
  any `x-meshserve-tenant` the client sent and set it from the API key it checked (ext_authz,
  services/router/edge_authz.py), so only from Envoy is that header believed; a request without
  it is UNAUTHENTICATED, a tenant asking for a model it was not granted PERMISSION_DENIED.
- any other mesh identity (an operator's tools, another service) is a caller inside the mesh,
  authenticated by its certificate, and may call every model; a tenant header it sends is
  ignored.
With --insecure-dev nobody can be told apart: nothing is enforced (development only).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.common.auth_records import KeySet
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.tls import describe_peer, peer_identity

TENANT_HEADER = "x-meshserve-tenant"
HOW_TO_AUTHENTICATE = ("send an API key as `authorization: Bearer msk_...` (an operator makes one "
                       "with `meshctl keys create TENANT`)")


@dataclass(frozen=True)
class Caller:
    tenant: str | None  # a tenant of the public API, or None for a caller inside the mesh
    who: str


class Access:
    def __init__(self, keys: KeySet, enforce: bool) -> None:
        self.keys = keys
        self.enforce = enforce

    def caller(self, context: Any) -> Caller:
        if not self.enforce:
            return Caller(None, "insecure-dev")
        ident = peer_identity(context)
        if ident is None:
            raise Unauthenticated("no mesh client certificate; " + HOW_TO_AUTHENTICATE)
        if ident.kind != "envoy":
            return Caller(None, describe_peer(context))
        tenants = [v for k, v in context.invocation_metadata() or () if k == TENANT_HEADER]
        if len(tenants) != 1 or not tenants[0]:
            raise Unauthenticated("no authenticated tenant; " + HOW_TO_AUTHENTICATE)
        if tenants[0] not in self.keys.tenants:
            raise Unauthenticated(f"tenant {tenants[0]} does not exist (any more)")
        return Caller(tenants[0], f"tenant {tenants[0]}")

    def check_model(self, caller: Caller, model: str) -> None:
        if caller.tenant is not None and not self.keys.may_call(caller.tenant, model):
            raise PermissionDenied(f"tenant {caller.tenant} may not call model {model!r}; an operator "
                                   "grants models per tenant (`meshctl tenants create`)")

    def admit(self, context: Any, model: str) -> Caller:
        """The caller, once it may call `model` (else Unauthenticated / PermissionDenied)."""
        caller = self.caller(context)
        self.check_model(caller, model)
        return caller

    def visible(self, caller: Caller, model: str) -> bool:
        return caller.tenant is None or self.keys.may_call(caller.tenant, model)
