"""AutoscaleService: thin (convert -> call -> convert). Any replica answers from its view; an
explanation needs the leader's live numbers, so a follower asks the leader for it (and answers
with the stored decision when the leader cannot be reached)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import grpc
from meshserve.v1 import autoscale_pb2 as asp
from meshserve.v1 import autoscale_pb2_grpc

from services.common import names
from services.common.etcd_client import EtcdClient
from services.common.grpc_util import CHANNEL_OPTIONS
from services.common.membership import MeshView

from . import explain
from .autoscaler import Autoscaler
from .capacity import capacity
from .settings import AutoscaleSettings

log = logging.getLogger(__name__)

SERVICE_NAME = asp.DESCRIPTOR.services_by_name["AutoscaleService"].full_name
FORWARDED = "x-meshserve-forwarded"
FORWARD_TIMEOUT_S = 3.0


class AutoscaleServicer(autoscale_pb2_grpc.AutoscaleServiceServicer):
    def __init__(self, etcd: EtcdClient, view: MeshView, replica_id: str,
                 autoscaler: Callable[[], Autoscaler | None]) -> None:
        self._view = view
        self._replica_id = replica_id
        self._autoscaler = autoscaler
        self._settings = AutoscaleSettings(etcd, view)
        self._leader: tuple[str, grpc.aio.Channel] | None = None

    async def SetAutoscalePolicy(self, request: asp.SetAutoscalePolicyRequest,
                                 context) -> asp.SetAutoscalePolicyResponse:
        return asp.SetAutoscalePolicyResponse(policy=await self._settings.set_policy(request.policy))

    async def GetAutoscale(self, request: asp.GetAutoscaleRequest, context) -> asp.GetAutoscaleResponse:
        return explain.get(self._view, names.check_model_name(request.model))

    async def ExplainAutoscale(self, request: asp.ExplainAutoscaleRequest,
                               context) -> asp.ExplainAutoscaleResponse:
        model = names.check_model_name(request.model)
        scaler = self._autoscaler()
        track = scaler.tracks.get(model) if scaler is not None else None
        if track is not None:
            return explain.live(self._view, track, self._replica_id, time.time())
        answer = explain.stored(self._view, model, self._replica_id)  # NotFound first
        forwarded = any(k == FORWARDED for k, _ in context.invocation_metadata() or ())
        leader = self._view.leader
        if leader is None or leader.replica_id == self._replica_id or forwarded or not leader.address:
            return answer
        try:
            return await self._ask_leader(leader.address, request)
        except grpc.aio.AioRpcError as exc:
            log.info("explain %s: leader %s did not answer (%s)", model, leader.replica_id,
                     exc.code().name)
            return answer

    async def _ask_leader(self, address: str, request: asp.ExplainAutoscaleRequest
                          ) -> asp.ExplainAutoscaleResponse:
        if self._leader is None or self._leader[0] != address:
            if self._leader is not None:
                await self._leader[1].close()
            self._leader = (address, grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
        stub = autoscale_pb2_grpc.AutoscaleServiceStub(self._leader[1])
        return await stub.ExplainAutoscale(request, timeout=FORWARD_TIMEOUT_S,
                                           metadata=((FORWARDED, "1"),))

    async def GetScalingBudgets(self, request, context) -> asp.GetScalingBudgetsResponse:
        return asp.GetScalingBudgetsResponse(budgets=self._view.scaling_budgets or asp.ScalingBudgets())

    async def SetScalingBudgets(self, request: asp.SetScalingBudgetsRequest,
                                context) -> asp.SetScalingBudgetsResponse:
        return asp.SetScalingBudgetsResponse(budgets=await self._settings.set_budgets(request.budgets))

    async def GetCapacity(self, request, context) -> asp.GetCapacityResponse:
        scaler = self._autoscaler()
        return capacity(self._view, scaler.replicas() if scaler is not None else None)

    async def close(self) -> None:
        if self._leader is not None:
            await self._leader[1].close()
