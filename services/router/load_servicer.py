"""RouterLoadService: the router's demand per model for the control-plane leader's autoscaler
(thin: read the dispatcher's figures, convert). Internal; Envoy does not route it."""

from __future__ import annotations

from meshserve.v1 import routerload_pb2, routerload_pb2_grpc

from services.common.lifecycle import now_ms

from .dispatch import Dispatcher

SERVICE_NAME = routerload_pb2.DESCRIPTOR.services_by_name["RouterLoadService"].full_name


class RouterLoadServicer(routerload_pb2_grpc.RouterLoadServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def GetRouterLoad(self, request, context) -> routerload_pb2.GetRouterLoadResponse:
        d = self._dispatcher
        out = routerload_pb2.GetRouterLoadResponse(router_id=d.router_id, timestamp_ms=now_ms())
        for f in d.stats.figures():
            out.models.add(model=f.model, queued=d.admission.waiting(f.model),
                           waiting_for_replica=d.admission.waiting_for_replica(f.model),
                           in_flight=f.in_flight, requests_total=f.requests_total,
                           ttft_p95_ms=f.ttft_p95_s * 1000, ttft_samples=f.ttft_samples)
        return out
