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

import dataclasses
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass
from typing import Any

from meshserve.v1 import inference_pb2

from services.common.auth_records import KeySet
from services.common.errors import PermissionDenied, Unauthenticated
from services.common.tls import describe_peer, peer_identity
from services.common.validation import ValidRequest

from .quota import TenantQuotas

TENANT_HEADER = "x-meshserve-tenant"
HOW_TO_AUTHENTICATE = ("send an API key as `authorization: Bearer msk_...` (an operator makes one "
                       "with `meshctl keys create TENANT`)")


@dataclass(frozen=True)
class Caller:
    tenant: str | None  # a tenant of the public API, or None for a caller inside the mesh
    who: str


class Access:
    def __init__(self, keys: KeySet, enforce: bool, quotas: TenantQuotas | None = None) -> None:
        self.keys = keys
        self.enforce = enforce
        self.quotas = quotas

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
        """The caller, once it may call `model` and its tenant is within quota (else
        Unauthenticated / PermissionDenied / ResourceExhausted with retry-after)."""
        caller = self.caller(context)
        self.check_model(caller, model)
        if caller.tenant is not None and self.quotas is not None:
            self.quotas.admit(caller.tenant)
        return caller

    async def meter(self, caller: Caller, chunks: AsyncIterator[inference_pb2.GenerateResponse]
                    ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """The chunks, unchanged; the usage of the last one is charged to the caller's tenant."""
        async for chunk in chunks:
            if chunk.finish_reason and caller.tenant is not None and self.quotas is not None:
                self.quotas.charge(caller.tenant, chunk.usage.prompt_tokens, chunk.usage.completion_tokens)
            yield chunk

    def bind_tenant(self, caller: Caller, req: ValidRequest) -> ValidRequest:
        """The request under its authenticated tenant: the shared cache partitions by
        `tenant`, so a tenant the client wrote into the request is replaced by the edge's
        identity (a caller inside the mesh keeps its own; --insecure-dev trusts the field)."""
        if not self.enforce or caller.tenant is None or req.tenant == caller.tenant:
            return req
        return dataclasses.replace(req, tenant=caller.tenant)

    def visible(self, caller: Caller, model: str) -> bool:
        return caller.tenant is None or self.keys.may_call(caller.tenant, model)
