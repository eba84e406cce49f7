"""ModelServerService: a thin gRPC layer over the ModelManager. Protobuf stops here."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

import grpc
from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

from services.common.validation import validate_generate

from . import metrics
from .convert import chunk_to_proto, load_to_proto, request_from_proto
from .engine.base import CapacityError, EngineUnavailableError, FinishReason, InvalidRequestError
from .manager import ModelManager

log = logging.getLogger(__name__)

DEFAULT_LOAD_INTERVAL_MS = 200
LOAD_HEARTBEAT_S = 5.0


class ModelServerServicer(modelserver_pb2_grpc.ModelServerServiceServicer):
    def __init__(self, manager: ModelManager,
                 info: Callable[[], modelserver_pb2.ServerInfo]) -> None:
        self._manager = manager
        self._info = info
        self.accepting = True

    async def Generate(self, request: modelserver_pb2.ModelServerServiceGenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[modelserver_pb2.ModelServerServiceGenerateResponse]:
        model = request.model
        try:
            validate_generate(request)
        except ValueError as exc:
            metrics.REQUESTS.labels(model[:64], "INVALID_ARGUMENT").inc()
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        engine = self._manager.get(model)
        if engine is None:
            metrics.REQUESTS.labels("unknown", "NOT_FOUND").inc()
            await context.abort(grpc.StatusCode.NOT_FOUND,
                                f"model {model!r} is not served by server {self._info().server_id}; "
                                f"it serves {', '.join(self._manager.ready_models()) or 'nothing'}")
            return  # not reached: abort raises
        if not self.accepting or not engine.ready:
            metrics.REQUESTS.labels(model, "UNAVAILABLE").inc()
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"server {self._info().server_id} is not accepting requests "
                                "(loading or shutting down); retry on another replica")
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        code = "OK"
        started = last = time.monotonic()
        first = True
        with self._manager.track(model):
            stream = engine.generate(request_from_proto(request, deadline))
            try:
                async for chunk in stream:
                    now = time.monotonic()
                    if chunk.token_ids:
                        if first:
                            metrics.TTFT.labels(model).observe(now - started)
                            first = False
                        else:
                            metrics.ITL.labels(model).observe((now - last) / len(chunk.token_ids))
                        last = now
                        metrics.GENERATED_TOKENS.labels(model).inc(len(chunk.token_ids))
                    if chunk.usage is not None:
                        metrics.PROMPT_TOKENS.labels(model).inc(chunk.usage.prompt_tokens)
                        metrics.CACHED_TOKENS.labels(model).inc(chunk.usage.cached_tokens)
                    if chunk.finish_reason is FinishReason.CANCELLED:
                        code = _cancel_code(deadline)  # the engine ended it: deadline or stop
                    yield chunk_to_proto(chunk)
            except InvalidRequestError as exc:
                code = "INVALID_ARGUMENT"
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            except CapacityError as exc:
                code = "RESOURCE_EXHAUSTED"
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
            except EngineUnavailableError as exc:
                code = "UNAVAILABLE"
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
            except asyncio.CancelledError:
                code = _cancel_code(deadline)
                raise
            except Exception:  # gRPC answers UNKNOWN for anything unexpected; count it as such
                code = "UNKNOWN"
                raise
            finally:
                await stream.aclose()
                metrics.REQUESTS.labels(model, code).inc()
                metrics.E2E.labels(model).observe(time.monotonic() - started)

    async def GetServerInfo(self, request, context) -> modelserver_pb2.GetServerInfoResponse:
        return modelserver_pb2.GetServerInfoResponse(info=self._info())

    def load_report(self) -> modelserver_pb2.LoadReport:
        return load_to_proto(self._info().server_id, self._manager.loads())

    async def StreamLoad(self, request: modelserver_pb2.StreamLoadRequest,
                         context: grpc.aio.ServicerContext
                         ) -> AsyncIterator[modelserver_pb2.StreamLoadResponse]:
        if request.interval_ms < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "interval_ms must be >= 0")
        interval = max(request.interval_ms or DEFAULT_LOAD_INTERVAL_MS, 20) / 1000.0
        last_key = None
        last_sent = 0.0
        while True:
            report = self.load_report()
            key = (report.queue_depth, report.running, report.kv_blocks_used, report.kv_blocks_total)
            now = time.monotonic()
            if key != last_key or now - last_sent >= LOAD_HEARTBEAT_S:
                yield modelserver_pb2.StreamLoadResponse(report=report)
                last_key, last_sent = key, now
            await asyncio.sleep(interval)

    def update_gauges(self) -> None:
        for name in self._manager.ready_models():
            engine = self._manager.get(name)
            if engine is None:
                continue
            load = engine.load()
            metrics.RUNNING.labels(name).set(load.running)
            metrics.WAITING.labels(name).set(load.queue_depth)
            metrics.KV_USED.labels(name).set(load.kv_blocks_used)
            metrics.KV_TOTAL.labels(name).set(load.kv_blocks_total)
            metrics.PREFIX_HIT_RATE.labels(name).set(load.prefix_cache_hit_rate)
            metrics.TOKENS_PER_SECOND.labels(name).set(load.tokens_per_second)
            metrics.follow_total(metrics.PREEMPTIONS, name, load.preemptions_total)
            metrics.follow_total(metrics.PREFIX_HIT_TOKENS, name, load.prefix_cache_hit_tokens_total)


def _cancel_code(deadline: float | None) -> str:
    """What the client sees for a request that ended early: its deadline passed, or it went away."""
    if deadline is not None and time.monotonic() >= deadline:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"
