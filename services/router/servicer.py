"""InferenceService on the router: a thin gRPC layer over Dispatcher (validate -> call -> convert)."""

from __future__ import annotations

from contextlib import aclosing

import grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.common.errors import ResourceExhausted
from services.common.slow_consumer import SlowConsumerGuard
from services.common.validation import validate_request

from .access import Access
from .convert import merge_chunks
from .dispatch import Dispatcher


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, dispatcher: Dispatcher, access: Access) -> None:
        self._dispatcher = dispatcher
        self._access = access

    async def Generate(self, request: inference_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> inference_pb2.GenerateResponse:
        req = validate_request(request)
        caller = self._access.admit(context, req.model)
        req = self._access.bind_tenant(caller, req)
        async with aclosing(self._access.meter(caller, self._dispatcher.stream(
                req, context.time_remaining(), context.invocation_metadata()))) as chunks:
            return merge_chunks([chunk async for chunk in chunks])

    async def GenerateStream(self, request: inference_pb2.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> None:
        """Written with context.write so a client that stops reading can be told apart and let go."""
        req = validate_request(request)
        caller = self._access.admit(context, req.model)
        req = self._access.bind_tenant(caller, req)
        limit = self._dispatcher.settings.slow_consumer_s
        guard = SlowConsumerGuard(limit)
        try:
            async with aclosing(self._access.meter(caller, self._dispatcher.stream(
                    req, context.time_remaining(), context.invocation_metadata()))) as chunks:
                async for chunk in chunks:
                    if not await guard.write(context, chunk):
                        raise ResourceExhausted(f"the client read nothing for {limit:g}s; the request was "
                                                "cancelled to free its server")
        finally:
            guard.close()

    async def ListModels(self, request: inference_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> inference_pb2.ListModelsResponse:
        out = inference_pb2.ListModelsResponse()
        caller = self._access.caller(context)
        for m in self._dispatcher.models():
            if not self._access.visible(caller, m.name):
                continue
            out.models.add(name=m.name, ready_replicas=m.ready_replicas, regions=m.regions)
        return out
