"""ControlPlaneService: operator RPCs over etcd state. Thin; the logic is in status.py."""

from __future__ import annotations

import grpc
from meshserve.v1 import controlplane_pb2, controlplane_pb2_grpc

from services.common import keyspace
from services.common.etcd_client import EtcdClient, EtcdError
from services.common.lifecycle import now_ms
from services.common.membership import MeshView

from . import status


class ControlPlaneServicer(controlplane_pb2_grpc.ControlPlaneServiceServicer):
    def __init__(self, etcd: EtcdClient, view: MeshView, replica_id: str) -> None:
        self._etcd = etcd
        self._view = view
        self._replica_id = replica_id

    async def GetClusterStatus(self, request, context):
        resp = status.cluster_status(self._view, self._replica_id)
        for m in await self._etcd.member_status():
            resp.etcd.add(**m)
        return resp

    async def ListServers(self, request: controlplane_pb2.ListServersRequest, context):
        return controlplane_pb2.ListServersResponse(
            servers=status.list_servers(self._view, request.region, request.model))

    async def _require_server(self, server_id: str, context, allow_missing_if_drained: bool = False):
        if not server_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "server_id is required")
        try:
            keyspace.drain_key(server_id)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if server_id not in self._view.servers and not (
                allow_missing_if_drained and self._view.is_draining(server_id)):
            known = ", ".join(sorted(self._view.servers)) or "none"
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"server {server_id!r} is not a member of the mesh (members: {known})")

    async def DrainServer(self, request: controlplane_pb2.DrainServerRequest, context):
        await self._require_server(request.server_id, context)
        record = controlplane_pb2.DrainRecord(server_id=request.server_id,
                                              reason=request.reason or "operator", since_ms=now_ms())
        try:
            await self._etcd.put(keyspace.drain_key(request.server_id), keyspace.encode(record))
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unreachable, nothing changed: {exc}")
        self._view.drains[request.server_id] = record  # our own write; the watch confirms it
        return controlplane_pb2.DrainServerResponse(
            server=status.server_status(self._view, request.server_id))

    async def UndrainServer(self, request: controlplane_pb2.UndrainServerRequest, context):
        await self._require_server(request.server_id, context, allow_missing_if_drained=True)
        try:
            await self._etcd.delete(keyspace.drain_key(request.server_id))
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"etcd is unreachable, nothing changed: {exc}")
        self._view.drains.pop(request.server_id, None)
        server = status.server_status(self._view, request.server_id)
        return controlplane_pb2.UndrainServerResponse(server=server)
