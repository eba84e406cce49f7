"""KEDA's external scaler protocol (protos/externalscaler), served by every control-plane
replica: KEDA scales a model's model-server Deployment to the replicas the autoscaler decided.

A ScaledObject names the model in its trigger metadata (`model: NAME`). The metric is the desired
replica count itself with a target of 1 per pod, so the HPA KEDA creates computes exactly that
count; IsActive / StreamIsActive say whether the model wants any replica (KEDA's scale from and to
zero). Answers come from the view, so any replica answers alike; unknown models are NOT_FOUND and a
ScaledObject without `model` is INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from externalscaler import externalscaler_pb2 as es
from externalscaler import externalscaler_pb2_grpc

from services.common import names
from services.common.errors import InvalidArgument, NotFound
from services.common.membership import MeshView

from .effective import effective_replicas

SERVICE_NAME = es.DESCRIPTOR.services_by_name["ExternalScaler"].full_name
METRIC_PREFIX = "meshserve-desired-replicas-"
#: How often a StreamIsActive stream re-checks (it sends only changes).
STREAM_POLL_S = 0.5


class ExternalScalerServicer(externalscaler_pb2_grpc.ExternalScalerServicer):
    def __init__(self, view: MeshView, poll_s: float = STREAM_POLL_S) -> None:
        self._view = view
        self._poll_s = poll_s

    def _model(self, ref: es.ScaledObjectRef) -> str:
        model = ref.scalerMetadata.get("model", "")
        if not model:
            raise InvalidArgument(f"ScaledObject {ref.namespace}/{ref.name}: the trigger metadata "
                                  "needs `model: NAME` (the MeshServe model to scale)")
        names.check_model_name(model)
        if model not in self._view.models:
            known = ", ".join(sorted(self._view.models)) or "none"
            raise NotFound(f"model {model!r} is not deployed (deployed: {known})")
        return model

    def desired(self, model: str) -> int:
        spec = self._view.models.get(model)
        if spec is None:
            return 0
        return effective_replicas(self._view).get(model, spec.replicas)

    async def IsActive(self, request: es.ScaledObjectRef, context) -> es.IsActiveResponse:
        return es.IsActiveResponse(result=self.desired(self._model(request)) > 0)

    async def StreamIsActive(self, request: es.ScaledObjectRef, context) -> AsyncIterator[es.IsActiveResponse]:
        model = self._model(request)
        last: bool | None = None
        while True:
            active = model in self._view.models and self.desired(model) > 0
            if active != last:
                last = active
                yield es.IsActiveResponse(result=active)
            await asyncio.sleep(self._poll_s)

    def _spec(self, model: str) -> es.GetMetricSpecResponse:
        return es.GetMetricSpecResponse(metricSpecs=[es.MetricSpec(
            metricName=METRIC_PREFIX + model, targetSize=1, targetSizeFloat=1.0)])

    async def GetMetricSpec(self, request: es.ScaledObjectRef, context) -> es.GetMetricSpecResponse:
        return self._spec(self._model(request))

    async def StreamMetricSpec(self, request: es.ScaledObjectRef,
                               context) -> AsyncIterator[es.GetMetricSpecResponse]:
        """The target never changes: send it once and keep the stream open."""
        yield self._spec(self._model(request))
        await asyncio.Event().wait()

    async def GetMetrics(self, request: es.GetMetricsRequest, context) -> es.GetMetricsResponse:
        model = self._model(request.scaledObjectRef)
        desired = self.desired(model)
        return es.GetMetricsResponse(metricValues=[es.MetricValue(
            metricName=request.metricName or METRIC_PREFIX + model, metricValue=desired,
            metricValueFloat=float(desired))])
