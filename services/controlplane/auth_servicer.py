"""AuthService on the control plane: thin (convert -> AuthOps -> convert). Who may call what is
OperatorGate's business (services/controlplane/operator_gate.py), not this module's."""

from __future__ import annotations

from meshserve.v1 import auth_pb2, auth_pb2_grpc

from services.common.etcd_client import EtcdClient
from services.common.tls import describe_peer

from .auth_ops import AuthOps

SERVICE_NAME = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name


class AuthServicer(auth_pb2_grpc.AuthServiceServicer):
    def __init__(self, etcd: EtcdClient) -> None:
        self.ops = AuthOps(etcd)

    async def CreateTenant(self, request: auth_pb2.CreateTenantRequest, context) -> auth_pb2.CreateTenantResponse:
        await self.ops.create_tenant(request.tenant, request.replace)
        return auth_pb2.CreateTenantResponse()

    async def ListTenants(self, request: auth_pb2.ListTenantsRequest, context) -> auth_pb2.ListTenantsResponse:
        return auth_pb2.ListTenantsResponse(tenants=await self.ops.tenants())

    async def DeleteTenant(self, request: auth_pb2.DeleteTenantRequest, context) -> auth_pb2.DeleteTenantResponse:
        await self.ops.delete_tenant(request.name)
        return auth_pb2.DeleteTenantResponse()

    async def CreateApiKey(self, request: auth_pb2.CreateApiKeyRequest, context) -> auth_pb2.CreateApiKeyResponse:
        key_id, whole = await self.ops.create_key(request.tenant, describe_peer(context))
        return auth_pb2.CreateApiKeyResponse(key_id=key_id, api_key=whole)

    async def ListApiKeys(self, request: auth_pb2.ListApiKeysRequest, context) -> auth_pb2.ListApiKeysResponse:
        return auth_pb2.ListApiKeysResponse(keys=await self.ops.keys(request.tenant))

    async def RevokeApiKey(self, request: auth_pb2.RevokeApiKeyRequest, context) -> auth_pb2.RevokeApiKeyResponse:
        await self.ops.revoke_key(request.key_id)
        return auth_pb2.RevokeApiKeyResponse()

    async def ListAuditEvents(self, request: auth_pb2.ListAuditEventsRequest,
                              context) -> auth_pb2.ListAuditEventsResponse:
        return auth_pb2.ListAuditEventsResponse(events=await self.ops.audit_events(request.limit))
