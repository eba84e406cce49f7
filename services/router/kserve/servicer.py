"""GRPCInferenceService (KServe v2 / Triton) on the router: a thin gRPC layer over Dispatcher.

Requests take the same path as InferenceService's (validation, picking, retries before the first
token); mapping.py does the tensor translation. On ModelStreamInfer the requests of one stream run
concurrently, as on Triton, and a failed request becomes an error_message on the stream instead of
ending it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from importlib import metadata

import grpc
from inference import grpc_service_pb2 as kserve_pb2
from inference import grpc_service_pb2_grpc as kserve_pb2_grpc

from services.common.errors import NotFound, ServiceError

from ..dispatch import Dispatcher, RouteError, merge_chunks
from . import mapping

log = logging.getLogger(__name__)

SERVICE_NAME = kserve_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: Requests one stream may have in flight; past that the router stops reading the stream, so
#: HTTP/2 flow control holds the client back.
MAX_IN_FLIGHT_PER_STREAM = 64
_END = object()


def _server_version() -> str:
    try:
        return metadata.version("meshserve")
    except metadata.PackageNotFoundError:
        return "unknown"


class KServeServicer(kserve_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dispatcher: Dispatcher) -> None:
        self._dispatcher = dispatcher
        self._version = _server_version()

    # --- health and metadata -----------------------------------------------------------------

    def _ready_models(self) -> set[str]:
        return {m.name for m in self._dispatcher.models() if m.ready_replicas > 0}

    def _require_model(self, name: str) -> None:
        """RouteError unless some member lists the model (ready or not)."""
        if not name:
            raise RouteError(grpc.StatusCode.INVALID_ARGUMENT, "model name is required")
        known = self._dispatcher.known_models()
        if name not in known:
            served = ", ".join(sorted(known)) or "none"
            raise RouteError(grpc.StatusCode.NOT_FOUND,
                             f"model {name!r} is not served by this mesh (served models: {served})")

    async def ServerLive(self, request: kserve_pb2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> kserve_pb2.ServerLiveResponse:
        return kserve_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kserve_pb2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> kserve_pb2.ServerReadyResponse:
        return kserve_pb2.ServerReadyResponse(ready=bool(self._ready_models()))

    async def ModelReady(self, request: kserve_pb2.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> kserve_pb2.ModelReadyResponse:
        if not request.name:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "model name is required")
        ready = (request.version in ("", mapping.MODEL_VERSION)
                 and request.name in self._ready_models())
        return kserve_pb2.ModelReadyResponse(ready=ready)

    async def ServerMetadata(self, request: kserve_pb2.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext
                             ) -> kserve_pb2.ServerMetadataResponse:
        # "parameters": request parameters are read (triton_enable_empty_final_response) and
        # responses carry parameters (triton_final_response, meshserve_*).
        return kserve_pb2.ServerMetadataResponse(name="meshserve", version=self._version,
                                                 extensions=["parameters"])

    async def ModelMetadata(self, request: kserve_pb2.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> kserve_pb2.ModelMetadataResponse:
        try:
            self._require_model(request.name)
            mapping.check_version(request.name, request.version)
            return mapping.model_metadata(request.name)
        except RouteError as exc:
            raise ServiceError.of(exc.code, exc.message) from None
        except mapping.UnknownVersion as exc:
            raise NotFound(str(exc)) from None

    # --- inference ---------------------------------------------------------------------------

    def _translate(self, request: kserve_pb2.ModelInferRequest) -> mapping.InferCall:
        """The request as an InferCall, or RouteError with the status the client should get."""
        self._require_model(request.model_name)
        try:
            return mapping.to_generate(request)
        except mapping.InvalidInput as exc:
            raise RouteError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
        except mapping.UnknownVersion as exc:
            raise RouteError(grpc.StatusCode.NOT_FOUND, str(exc)) from None

    async def ModelInfer(self, request: kserve_pb2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> kserve_pb2.ModelInferResponse:
        try:
            call = self._translate(request)
            if call.stream:
                raise RouteError(grpc.StatusCode.INVALID_ARGUMENT,
                                 "input 'stream' is true, but ModelInfer returns one response; "
                                 "use ModelStreamInfer (tritonclient: start_stream + "
                                 "async_stream_infer) for one response per token, or set "
                                 "stream=false")
            chunks = [c async for c in self._dispatcher.stream(
                call.generate, context.time_remaining(), context.invocation_metadata())]
            return mapping.to_infer_response(call, merge_chunks(chunks))
        except RouteError as exc:
            raise ServiceError.of(exc.code, exc.message, exc.trailers) from None

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[kserve_pb2.ModelInferRequest],
                               context: grpc.aio.ServicerContext
                               ) -> AsyncIterator[kserve_pb2.ModelStreamInferResponse]:
        out: asyncio.Queue = asyncio.Queue(maxsize=MAX_IN_FLIGHT_PER_STREAM)
        slots = asyncio.Semaphore(MAX_IN_FLIGHT_PER_STREAM)
        tasks: set[asyncio.Task] = set()

        def finished(task: asyncio.Task) -> None:
            tasks.discard(task)
            slots.release()

        async def read_requests() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    task = asyncio.create_task(self._answer(request, out, context))
                    tasks.add(task)
                    task.add_done_callback(finished)
                while tasks:
                    await asyncio.wait(set(tasks))
            finally:
                await out.put(_END)

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await out.get()) is not _END:
                yield item
            await reader  # re-raises what broke the request stream, if anything did
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _answer(self, request: kserve_pb2.ModelInferRequest, out: asyncio.Queue,
                      context: grpc.aio.ServicerContext) -> None:
        """Every response to one request on a stream, or its error, onto `out`."""
        try:
            call = self._translate(request)
            final_sent = False
            if call.stream:
                async for chunk in self._dispatcher.stream(call.generate, context.time_remaining()):
                    final_sent = bool(chunk.finish_reason) and not call.empty_final
                    await out.put(kserve_pb2.ModelStreamInferResponse(
                        infer_response=mapping.to_infer_response(call, chunk, final=final_sent)))
            else:
                chunks = [c async for c in self._dispatcher.stream(call.generate,
                                                                   context.time_remaining())]
                final_sent = not call.empty_final
                await out.put(kserve_pb2.ModelStreamInferResponse(
                    infer_response=mapping.to_infer_response(call, merge_chunks(chunks),
                                                             final=final_sent)))
            if not final_sent:
                await out.put(kserve_pb2.ModelStreamInferResponse(
                    infer_response=mapping.final_marker(call)))
        except RouteError as exc:
            await out.put(mapping.stream_error(request, exc.code.name, exc.message))
        except Exception as exc:
            log.exception("KServe stream request %r failed", request.id)
            await out.put(mapping.stream_error(request, grpc.StatusCode.INTERNAL.name,
                                               f"internal error: {exc!r}"))
