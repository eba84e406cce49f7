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
from contextlib import aclosing
from importlib import metadata

import grpc
from inference import grpc_service_pb2 as kserve_pb2
from inference import grpc_service_pb2_grpc as kserve_pb2_grpc

from services.common.errors import InvalidArgument, NotFound, ServiceError
from services.common.validation import ValidRequest, validate_request

from ..access import Access, Caller
from ..convert import merge_chunks
from ..dispatch import Dispatcher
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
    def __init__(self, dispatcher: Dispatcher, access: Access) -> None:
        self._dispatcher = dispatcher
        self._access = access
        self._version = _server_version()

    # --- health and metadata -----------------------------------------------------------------

    def _ready_models(self) -> set[str]:
        return {m.name for m in self._dispatcher.models() if m.ready_replicas > 0}

    def _require_model(self, name: str) -> None:
        """NotFound unless some member lists the model (ready or not)."""
        if not name:
            raise InvalidArgument("model name is required")
        known = self._dispatcher.known_models()
        if name not in known:
            served = ", ".join(sorted(known)) or "none"
            raise NotFound(f"model {name[:128]!r} is not served by this mesh (served models: {served})")

    async def ServerLive(self, request: kserve_pb2.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> kserve_pb2.ServerLiveResponse:
        return kserve_pb2.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kserve_pb2.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> kserve_pb2.ServerReadyResponse:
        return kserve_pb2.ServerReadyResponse(ready=bool(self._ready_models()))

    async def ModelReady(self, request: kserve_pb2.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> kserve_pb2.ModelReadyResponse:
        if not request.name:
            raise InvalidArgument("model name is required")
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
        self._require_model(request.name)
        mapping.check_version(request.name, request.version)
        return mapping.model_metadata(request.name)

    # --- inference ---------------------------------------------------------------------------

    def _translate(self, request: kserve_pb2.ModelInferRequest,
                   context: grpc.aio.ServicerContext) -> tuple[mapping.InferCall, ValidRequest, Caller]:
        """The request as an InferCall and its validated generate request (or a ServiceError),
        once the caller may call the model."""
        caller = self._access.admit(context, request.model_name)
        self._require_model(request.model_name)
        call = mapping.to_generate(request)
        return call, self._access.bind_tenant(caller, validate_request(call.generate)), caller

    async def ModelInfer(self, request: kserve_pb2.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> kserve_pb2.ModelInferResponse:
        call, req, caller = self._translate(request, context)
        if call.stream:
            raise InvalidArgument("input 'stream' is true, but ModelInfer returns one response; use "
                                  "ModelStreamInfer (tritonclient: start_stream + async_stream_infer) for one "
                                  "response per token, or set stream=false")
        async with aclosing(self._access.meter(caller, self._dispatcher.stream(
                req, context.time_remaining(), context.invocation_metadata()))) as chunks:
            return mapping.to_infer_response(call, merge_chunks([c async for c in chunks]))

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
            call, req, caller = self._translate(request, context)
            stream = self._access.meter(caller, self._dispatcher.stream(
                req, context.time_remaining(), context.invocation_metadata()))
            final_sent = False
            async with aclosing(stream) as chunks:
                if call.stream:
                    async for chunk in chunks:
                        final_sent = bool(chunk.finish_reason) and not call.empty_final
                        await out.put(kserve_pb2.ModelStreamInferResponse(
                            infer_response=mapping.to_infer_response(call, chunk, final=final_sent)))
                else:
                    answer = merge_chunks([c async for c in chunks])
                    final_sent = not call.empty_final
                    await out.put(kserve_pb2.ModelStreamInferResponse(
                        infer_response=mapping.to_infer_response(call, answer, final=final_sent)))
            if not final_sent:
                await out.put(kserve_pb2.ModelStreamInferResponse(infer_response=mapping.final_marker(call)))
        except ServiceError as exc:
            await out.put(mapping.stream_error(request, exc.code.name, exc.message))
        except Exception as exc:
            log.exception("KServe stream request %r failed", request.id[:128])
            await out.put(mapping.stream_error(request, grpc.StatusCode.INTERNAL.name,
                                               f"internal error: {type(exc).__name__}"))
