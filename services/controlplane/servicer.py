"""ControlPlaneService: operator RPCs over etcd state. Any replica answers; writes are desired
state in etcd, which the leader's reconciler acts on.

Thin: convert -> call -> convert. Writes are in operations.py, views in status.py and desired.py,
answers about "now" in quorum.py. Errors are raised as services.common.errors and mapped to gRPC
status by the interceptor every server installs.
"""

from __future__ import annotations

import asyncio

from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc

from services.common.etcd_client import EtcdClient
from services.common.membership import MeshView
from services.common.routing_defaults import default_policy

from . import desired, quorum, status
from .operations import Operations
from .probes import ServerProbe

LOAD_TIMEOUT_S = 1.0


class ControlPlaneServicer(controlplane_pb2_grpc.ControlPlaneServiceServicer):
    def __init__(self, etcd: EtcdClient, view: MeshView, replica_id: str,
                 probe: ServerProbe) -> None:
        self._etcd = etcd
        self._view = view
        self._replica_id = replica_id
        self._probe = probe
        self._ops = Operations(etcd, view)

    # --- reads -------------------------------------------------------------------------------

    async def GetClusterStatus(self, request, context) -> cp.GetClusterStatusResponse:
        servers = status.list_servers(self._view)
        (leader, problem), members, *loads = await asyncio.gather(
            quorum.read_leader(self._etcd), self._etcd.member_status(),
            *(self._probe.load(s.info.server_id, s.info.address, LOAD_TIMEOUT_S) for s in servers))
        resp = status.cluster_status(self._view, self._replica_id, leader, problem)
        resp.deployments.extend(desired.deployments(self._view))
        by_id = {s.info.server_id: load for s, load in zip(servers, loads, strict=True)}
        for server in resp.servers:
            load = by_id.get(server.info.server_id)
            if load is not None:
                server.load.CopyFrom(load)
        for m in members:
            resp.etcd.add(**m)
        return resp

    async def ListServers(self, request: cp.ListServersRequest, context) -> cp.ListServersResponse:
        return cp.ListServersResponse(servers=status.list_servers(
            self._view, request.region, request.model, dict(request.labels)))

    async def ListDeployments(self, request, context) -> cp.ListDeploymentsResponse:
        return cp.ListDeploymentsResponse(deployments=desired.deployments(self._view))

    async def ListPlacements(self, request: cp.ListPlacementsRequest,
                             context) -> cp.ListPlacementsResponse:
        return cp.ListPlacementsResponse(placements=status.placements(self._view, request.model))

    async def GetLeader(self, request, context) -> cp.GetLeaderResponse:
        leader = await quorum.current_leader(self._etcd)
        return cp.GetLeaderResponse(leader=leader, answered_by=self._replica_id)

    async def GetRoutingPolicy(self, request, context) -> cp.GetRoutingPolicyResponse:
        return cp.GetRoutingPolicyResponse(policy=self._view.routing_policy or default_policy())

    # --- writes ------------------------------------------------------------------------------

    async def DrainServer(self, request: cp.DrainServerRequest, context) -> cp.DrainServerResponse:
        server = await self._ops.drain(request.server_id, request.reason, request.wait_seconds)
        return cp.DrainServerResponse(server=server)

    async def UndrainServer(self, request: cp.UndrainServerRequest,
                            context) -> cp.UndrainServerResponse:
        return cp.UndrainServerResponse(server=await self._ops.undrain(request.server_id))

    async def DeployModel(self, request: cp.DeployModelRequest, context) -> cp.DeployModelResponse:
        return cp.DeployModelResponse(deployment=await self._ops.deploy(request.spec))

    async def ScaleModel(self, request: cp.ScaleModelRequest, context) -> cp.ScaleModelResponse:
        deployment = await self._ops.scale(request.name, request.replicas, request.regions)
        return cp.ScaleModelResponse(deployment=deployment)

    async def UndeployModel(self, request: cp.UndeployModelRequest,
                            context) -> cp.UndeployModelResponse:
        await self._ops.undeploy(request.name)
        return cp.UndeployModelResponse()

    async def RetryModel(self, request: cp.RetryModelRequest, context) -> cp.RetryModelResponse:
        return cp.RetryModelResponse(deployment=await self._ops.retry(request.name))

    async def SetRoutingPolicy(self, request: cp.SetRoutingPolicyRequest,
                               context) -> cp.SetRoutingPolicyResponse:
        return cp.SetRoutingPolicyResponse(policy=await self._ops.set_policy(request.policy))
