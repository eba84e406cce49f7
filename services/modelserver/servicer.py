"""ModelServerService: a thin gRPC layer over the ModelManager. Protobuf stops here.

Errors are services/common/errors.py's (the engines' InvalidRequestError, CapacityError and
EngineUnavailableError are among them); the status interceptor maps them for every call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable

import grpc
from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

from services.common import tracing
from services.common.errors import InvalidArgument, NotFound, ResourceExhausted, ServiceError, Unavailable
from services.common.grpc_util import require_peer
from services.common.slow_consumer import SlowConsumerGuard
from services.common.validation import check_tenant

from . import cache_rpc, metrics
from .convert import chunk_to_proto, load_to_proto, request_from_proto
from .engine.base import Engine, EngineLoad, FinishReason, GenerationChunk, GenerationRequest
from .manager import ModelManager
from .response_cache import Recorder, ResponseCache
from .spans import EngineTimes, generate_span, trace_engine

log = logging.getLogger(__name__)

DEFAULT_LOAD_INTERVAL_MS = 200
#: A report goes out at least this often, so routers read silence as a hung server.
LOAD_HEARTBEAT_S = 1.0
#: A caller that reads nothing for this long has its generation cancelled (flow control
#: already paused it; this frees its engine slot and KV blocks).
DEFAULT_SLOW_CONSUMER_S = 60.0


#: Who may call a model server: routers and job workers (requests, load), the control plane (probes) and
#: `client` tools (readiness checks, benchmarks). Not Envoy, gateways or tenants: everything from
#: outside goes through a router, where authentication, authorisation and quotas are.
CALLERS = frozenset({"router", "jobworker", "controlplane", "client"})
#: Who may drop a server's cached KV blocks and answers (`meshctl cache flush`).
OPERATORS = frozenset({"operator"})

class ModelServerServicer(modelserver_pb2_grpc.ModelServerServiceServicer):
    def __init__(self, manager: ModelManager, info: Callable[[], modelserver_pb2.ServerInfo],
                 slow_consumer_s: float = DEFAULT_SLOW_CONSUMER_S) -> None:
        self._manager = manager
        self._info = info
        self._slow_consumer_s = slow_consumer_s
        self.accepting = True
        self._responses = ResponseCache()

    def _engine(self, model: str) -> Engine:
        engine = self._manager.get(model)
        if engine is None:
            raise NotFound(f"model {model!r} is not served by server {self._info().server_id}; it serves "
                           f"{', '.join(self._manager.ready_models()) or 'nothing'}")
        if not self.accepting or not engine.ready:
            raise Unavailable(f"server {self._info().server_id} is not accepting requests (loading or "
                              "shutting down); retry on another replica")
        return engine

    async def Generate(self, request: modelserver_pb2.ModelServerServiceGenerateRequest,
                       context: grpc.aio.ServicerContext) -> None:
        require_peer(context, CALLERS, "a model server")
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        label, code = "unknown", "OK"
        span = generate_span(context, self._info().server_id)
        try:
            req = request_from_proto(request, deadline)
            engine = self._engine(req.model)
            label = req.model
            code = await self._relay(engine, req, context, span)
        except ServiceError as exc:
            code = exc.code.name
            raise
        except asyncio.CancelledError:
            code = _cancel_code(deadline)
            raise
        except Exception:
            code = "INTERNAL"
            raise
        finally:
            metrics.REQUESTS.labels(label, code).inc()
            if code != "OK":
                span.fail(code)
            span.end()

    async def _relay(self, engine: Engine, req: GenerationRequest, context: grpc.aio.ServicerContext,
                     span: tracing.Span) -> str:
        """Stream the engine's chunks to the caller, with usage that counts the whole answer.
        Returns the outcome for metrics: OK, or how the engine ended it early (deadline, stop)."""
        model, resumed = req.model, len(req.resume_token_ids)
        outcome = "OK"
        started = last = time.monotonic()
        produced = 0
        guard = SlowConsumerGuard(self._slow_consumer_s)
        times = EngineTimes()
        with self._manager.track(model):
            name = self._responses.key(engine, req)
            hit = await self._responses.lookup(model, name) if name is not None else None
            recorder = Recorder(name) if name is not None and hit is None else None
            stream = engine.generate(req) if hit is None else _one(hit)
            try:
                async for chunk in stream:
                    if recorder is not None:
                        recorder.add(chunk)
                    now = time.monotonic()
                    if chunk.token_ids:
                        if produced == 0:
                            times.first_token()
                        _observe_tokens(model, chunk, now - (started if produced == 0 else last), produced == 0)
                        produced += len(chunk.token_ids)
                        last = now
                    if chunk.usage is not None:
                        floor = resumed + produced
                        if chunk.usage.completion_tokens < floor:
                            chunk.usage = dataclasses.replace(chunk.usage, completion_tokens=floor)
                        times.usage, times.finish = chunk.usage, chunk.finish_reason
                        metrics.PROMPT_TOKENS.labels(model).inc(chunk.usage.prompt_tokens)
                        metrics.CACHED_TOKENS.labels(model).inc(chunk.usage.cached_tokens)
                    if chunk.finish_reason is FinishReason.CANCELLED:
                        outcome = _cancel_code(req.deadline)
                    if not await guard.write(context, chunk_to_proto(chunk)):
                        raise ResourceExhausted(
                            f"the caller read nothing for {self._slow_consumer_s:g}s; the generation was "
                            "cancelled to free the engine")
                if recorder is not None:
                    self._responses.save(model, recorder)
            finally:
                guard.close()
                await stream.aclose()
                metrics.E2E.labels(model).observe(time.monotonic() - started)
                trace_engine(span, req, times, produced, engine)
        return outcome

    def _engines(self) -> dict[str, Engine]:
        out = {}
        for name in self._manager.ready_models():
            engine = self._manager.get(name)
            if engine is not None:
                out[name] = engine
        return out

    async def GetTokenizer(self, request: modelserver_pb2.GetTokenizerRequest,
                           context: grpc.aio.ServicerContext) -> modelserver_pb2.GetTokenizerResponse:
        return cache_rpc.tokenizer(self._manager.get(request.model), request.model)

    async def GetCacheStats(self, request: modelserver_pb2.GetCacheStatsRequest,
                            context: grpc.aio.ServicerContext) -> modelserver_pb2.GetCacheStatsResponse:
        return await asyncio.to_thread(cache_rpc.stats, self._info().server_id, self._engines())

    async def FlushCache(self, request: modelserver_pb2.FlushCacheRequest,
                         context: grpc.aio.ServicerContext) -> modelserver_pb2.FlushCacheResponse:
        require_peer(context, OPERATORS, "FlushCache")
        check_tenant(request.tenant)
        return await cache_rpc.flush(self._engines(), request.model, request.tenant, request.shared)

    async def GetServerInfo(self, request: modelserver_pb2.GetServerInfoRequest,
                            context: grpc.aio.ServicerContext) -> modelserver_pb2.GetServerInfoResponse:
        require_peer(context, CALLERS, "a model server")
        return modelserver_pb2.GetServerInfoResponse(info=self._info())

    def loads(self) -> dict[str, EngineLoad]:
        """Load of every model that takes traffic here."""
        out = {}
        for name in self._manager.ready_models():
            engine = self._manager.get(name)
            if engine is not None:
                out[name] = engine.load()
        return out

    def load_report(self) -> modelserver_pb2.LoadReport:
        return load_to_proto(self._info().server_id, self.loads())

    async def StreamLoad(self, request: modelserver_pb2.StreamLoadRequest,
                         context: grpc.aio.ServicerContext) -> AsyncIterator[modelserver_pb2.StreamLoadResponse]:
        require_peer(context, CALLERS, "a model server")
        if request.interval_ms < 0:
            raise InvalidArgument(f"interval_ms must be >= 0 (0 = {DEFAULT_LOAD_INTERVAL_MS}), got "
                                  f"{request.interval_ms}")
        interval = min(max(request.interval_ms or DEFAULT_LOAD_INTERVAL_MS, 20), 1000) / 1000.0
        last_key: object = None
        last_sent = 0.0
        cursor = cache_rpc.EventCursor()
        while True:
            report = self.load_report()
            report.kv_events.extend(cursor.collect(self._engines()))
            key = tuple((m.model, m.queue_depth, m.running, m.kv_blocks_used, m.kv_blocks_total)
                        for m in report.models)
            now = time.monotonic()
            if key != last_key or report.kv_events or now - last_sent >= LOAD_HEARTBEAT_S:
                yield modelserver_pb2.StreamLoadResponse(report=report)
                last_key, last_sent = key, now
            await asyncio.sleep(interval)

    def update_gauges(self) -> None:
        for name, load in self.loads().items():
            metrics.RUNNING.labels(name).set(load.running)
            metrics.WAITING.labels(name).set(load.queue_depth)
            metrics.KV_USED.labels(name).set(load.kv_blocks_used)
            metrics.KV_TOTAL.labels(name).set(load.kv_blocks_total)
            metrics.PREFIX_HIT_RATE.labels(name).set(load.prefix_cache_hit_rate)
            metrics.TOKENS_PER_SECOND.labels(name).set(load.tokens_per_second)
            metrics.follow_total(metrics.PREEMPTIONS, name, load.preemptions_total)
            metrics.follow_total(metrics.PREFIX_HIT_TOKENS, name, load.prefix_cache_hit_tokens_total)


async def _one(chunk: GenerationChunk) -> AsyncGenerator[GenerationChunk, None]:
    """A cached answer as a stream of one chunk."""
    yield chunk


def _observe_tokens(model: str, chunk: GenerationChunk, gap: float, first: bool) -> None:
    if first:
        metrics.TTFT.labels(model).observe(gap)
    else:
        metrics.ITL.labels(model).observe(gap / len(chunk.token_ids))
    metrics.GENERATED_TOKENS.labels(model).inc(len(chunk.token_ids))


def _cancel_code(deadline: float | None) -> str:
    """What the caller sees for a request that ended early: its deadline passed, or it went away."""
    if deadline is not None and time.monotonic() >= deadline:
        return "DEADLINE_EXCEEDED"
    return "CANCELLED"
