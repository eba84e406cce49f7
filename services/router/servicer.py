"""InferenceService on the router: a thin gRPC layer over Dispatcher."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from .dispatch import Dispatcher, RouteError, merge_chunks


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher

    async def _serve(self, request: inference_pb2.GenerateRequest,
                     context: grpc.aio.ServicerContext
                     ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        try:
            async for chunk in self._dispatcher.stream(request, context.time_remaining(),
                                                       context.invocation_metadata()):
                yield chunk
        except RouteError as exc:
            await context.abort(exc.code, exc.message, trailing_metadata=exc.trailers)

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        return merge_chunks([chunk async for chunk in self._serve(request, context)])

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        async for chunk in self._serve(request, context):
            yield chunk

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        out = inference_pb2.ListModelsResponse()
        for m in self._dispatcher.models():
            out.models.add(name=m.name, ready_replicas=m.ready_replicas, regions=m.regions)
        return out
