"""TrafficService on every control-plane replica: thin (convert -> call -> convert) over
traffic_ops.py (writes) and traffic_status.py (views)."""

from __future__ import annotations

from meshserve.v1 import traffic_pb2 as tp
from meshserve.v1 import traffic_pb2_grpc

from services.common.etcd_client import EtcdClient
from services.common.membership import MeshView

from .traffic_ops import TrafficOps
from .traffic_status import list_status

SERVICE_NAME = tp.DESCRIPTOR.services_by_name["TrafficService"].full_name


class TrafficServicer(traffic_pb2_grpc.TrafficServiceServicer):
    def __init__(self, etcd: EtcdClient, view: MeshView) -> None:
        self._view = view
        self._ops = TrafficOps(etcd, view)

    async def SetTrafficPolicy(self, request: tp.SetTrafficPolicyRequest, context) -> tp.SetTrafficPolicyResponse:
        return tp.SetTrafficPolicyResponse(policy=await self._ops.set(request.policy))

    async def DeleteTrafficPolicy(self, request: tp.DeleteTrafficPolicyRequest,
                                  context) -> tp.DeleteTrafficPolicyResponse:
        await self._ops.delete(request.name)
        return tp.DeleteTrafficPolicyResponse()

    async def ListTrafficPolicies(self, request: tp.ListTrafficPoliciesRequest,
                                  context) -> tp.ListTrafficPoliciesResponse:
        return tp.ListTrafficPoliciesResponse(policies=list_status(self._view, request.name))

    async def ControlCanary(self, request: tp.ControlCanaryRequest, context) -> tp.ControlCanaryResponse:
        status = await self._ops.control_canary(request.name, request.action, request.reason)
        return tp.ControlCanaryResponse(status=status)


