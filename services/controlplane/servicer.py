"""ControlPlaneService: operator RPCs over etcd state. Any replica answers; writes are desired
state in etcd, which the leader's reconciler acts on. Thin: the logic is in status.py, specs.py
and desired.py."""

from __future__ import annotations

import asyncio

import grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc

from services.common import keyspace
from services.common.errors import InvalidArgument, NotFound
from services.common.etcd_client import EtcdClient, EtcdError, retrying
from services.common.lifecycle import now_ms
from services.common.membership import MeshView
from services.common.routing_defaults import default_policy

from . import desired, specs, status
from .probes import ServerProbe

DEFAULT_DRAIN_WAIT_S = 30
MAX_DRAIN_WAIT_S = 3600


class ControlPlaneServicer(controlplane_pb2_grpc.ControlPlaneServiceServicer):
    def __init__(self, etcd: EtcdClient, view: MeshView, replica_id: str,
                 probe: ServerProbe) -> None:
        self._etcd = etcd
        self._view = view
        self._replica_id = replica_id
        self._probe = probe

    # --- helpers -----------------------------------------------------------------------------

    async def _put(self, context, key: str, value: bytes) -> None:
        try:
            await retrying(lambda: self._etcd.put(key, value))
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"etcd is unreachable, nothing changed: {exc}")

    async def _delete(self, context, key: str) -> None:
        try:
            await retrying(lambda: self._etcd.delete(key))
        except EtcdError as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"etcd is unreachable, nothing changed: {exc}")

    async def _require_server(self, server_id: str, context, allow_missing_if_drained=False):
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

    async def _require_model(self, name: str, context) -> cp.ModelSpec:
        if not name:
            raise InvalidArgument("model name is required")
        spec = self._view.models.get(name)
        if spec is None:
            known = ", ".join(sorted(self._view.models)) or "none"
            raise NotFound(f"model {name!r} is not deployed (deployed: {known})")
        return spec

    def _deployment(self, name: str) -> cp.Deployment:
        return next((d for d in desired.deployments(self._view) if d.spec.name == name),
                    cp.Deployment(spec=self._view.models.get(name)))

    # --- reads -------------------------------------------------------------------------------

    async def GetClusterStatus(self, request, context):
        resp = status.cluster_status(self._view, self._replica_id)
        resp.deployments.extend(desired.deployments(self._view))
        loads = await asyncio.gather(*(self._probe.load(s.info.server_id, s.info.address, 1.0)
                                       for s in resp.servers))
        for server, load in zip(resp.servers, loads, strict=True):
            if load is not None:
                server.load.CopyFrom(load)
        for m in await self._etcd.member_status():
            resp.etcd.add(**m)
        return resp

    async def ListServers(self, request: cp.ListServersRequest, context):
        return cp.ListServersResponse(
            servers=status.list_servers(self._view, request.region, request.model))

    async def ListDeployments(self, request, context):
        return cp.ListDeploymentsResponse(deployments=desired.deployments(self._view))

    async def ListPlacements(self, request: cp.ListPlacementsRequest, context):
        return cp.ListPlacementsResponse(placements=status.placements(self._view, request.model))

    async def GetLeader(self, request, context):
        if self._view.leader is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "no control-plane leader right now (election in progress or etcd "
                                "unreachable); retry in a few seconds")
        return cp.GetLeaderResponse(leader=self._view.leader, answered_by=self._replica_id)

    async def GetRoutingPolicy(self, request, context):
        return cp.GetRoutingPolicyResponse(policy=self._view.routing_policy or default_policy())

    # --- writes ------------------------------------------------------------------------------

    async def DrainServer(self, request: cp.DrainServerRequest, context):
        await self._require_server(request.server_id, context)
        if not 0 <= request.wait_seconds <= MAX_DRAIN_WAIT_S:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"wait_seconds must be in [0, {MAX_DRAIN_WAIT_S}]")
        wait = request.wait_seconds or DEFAULT_DRAIN_WAIT_S
        record = cp.DrainRecord(server_id=request.server_id, reason=request.reason or "operator",
                                since_ms=now_ms(), release_deadline_ms=now_ms() + wait * 1000)
        await self._put(context, keyspace.drain_key(request.server_id), keyspace.encode(record))
        self._view.drains[request.server_id] = record  # our own write; the watch confirms it
        return cp.DrainServerResponse(server=status.server_status(self._view, request.server_id))

    async def UndrainServer(self, request: cp.UndrainServerRequest, context):
        await self._require_server(request.server_id, context, allow_missing_if_drained=True)
        await self._delete(context, keyspace.drain_key(request.server_id))
        self._view.drains.pop(request.server_id, None)
        return cp.UndrainServerResponse(server=status.server_status(self._view, request.server_id))

    def _known_regions(self) -> set[str]:
        return {s.region for s in self._view.servers.values()}

    async def DeployModel(self, request: cp.DeployModelRequest, context):
        spec = cp.ModelSpec()
        spec.CopyFrom(request.spec)
        spec.backend = spec.backend or "sim"
        try:
            specs.validate_spec(spec, self._known_regions())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if spec.name in self._view.models:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS,
                                f"model {spec.name!r} is already deployed; use ScaleModel "
                                "(meshctl model scale) or undeploy it first")
        spec.created_ms = spec.updated_ms = now_ms()
        await self._put(context, keyspace.model_key(spec.name), keyspace.encode(spec))
        self._view.models[spec.name] = spec
        return cp.DeployModelResponse(deployment=self._deployment(spec.name))

    async def ScaleModel(self, request: cp.ScaleModelRequest, context):
        current = await self._require_model(request.name, context)
        spec = cp.ModelSpec()
        spec.CopyFrom(current)
        try:
            specs.validate_replicas(request.replicas)
            regions = request.regions if len(request.regions) else spec.regions
            specs.validate_regions(regions, request.replicas, self._known_regions())
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        spec.replicas = request.replicas
        if len(request.regions):
            del spec.regions[:]
            spec.regions.extend(request.regions)
        spec.updated_ms = now_ms()
        await self._put(context, keyspace.model_key(spec.name), keyspace.encode(spec))
        self._view.models[spec.name] = spec
        return cp.ScaleModelResponse(deployment=self._deployment(spec.name))

    async def UndeployModel(self, request: cp.UndeployModelRequest, context):
        await self._require_model(request.name, context)
        await self._delete(context, keyspace.model_key(request.name))
        self._view.models.pop(request.name, None)
        return cp.UndeployModelResponse()

    async def SetRoutingPolicy(self, request: cp.SetRoutingPolicyRequest, context):
        policy = cp.RoutingPolicy()
        policy.CopyFrom(request.policy)
        try:
            specs.validate_policy(policy)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        policy.updated_ms = now_ms()
        await self._put(context, keyspace.ROUTING_POLICY, keyspace.encode(policy))
        return cp.SetRoutingPolicyResponse(policy=policy)
