"""The router's request path, independent of which public API received the request.

InferenceService and the KServe v2 servicer both call `Dispatcher.stream`. It validates, admits
by priority (shedding and queueing when every server is saturated), picks a server through the
routing policy, relays its stream, retries elsewhere before the first token, migrates the stream
after it (prompt plus the tokens so far continue on another server), and raises RouteError with
the gRPC status the client should get.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass

import grpc
from meshserve.v1 import common_pb2, inference_pb2, modelserver_pb2

from services.common.validation import DEFAULT_MAX_TOKENS, validate_generate

from . import metrics
from .admission import AdmissionQueue, QueueFull, QueueTimeout
from .config import DispatchSettings
from .migration import client_usage, resume_request
from .policy import Policy, RouteRequest, Settings, make_policy
from .policy.prefix import render
from .pool import Backend, BackendPool
from .retry_budget import RetryBudget

log = logging.getLogger(__name__)

#: Before the first token these codes mean "this server, not this request": try another one.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                       grpc.StatusCode.CANCELLED, grpc.StatusCode.ABORTED})
#: After tokens were relayed these codes mean the server (or the connection to it) broke.
MIGRATABLE = RETRYABLE | {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
#: Codes that count towards ejecting the server (outlier detection).
SERVER_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL,
                           grpc.StatusCode.UNKNOWN})
#: Upstream codes the client gets unchanged when not retried.
PASS_THROUGH = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                          grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED, grpc.StatusCode.FAILED_PRECONDITION,
                          grpc.StatusCode.OUT_OF_RANGE})


def merge_chunks(chunks: Iterable[inference_pb2.GenerateResponse]
                 ) -> inference_pb2.GenerateResponse:
    """A streamed answer as one response: texts joined, the last chunk's finish and usage."""
    answer = inference_pb2.GenerateResponse()
    texts: list[str] = []
    for chunk in chunks:
        texts.append(chunk.text)
        answer.token_ids.extend(chunk.token_ids)
        answer.logprobs.extend(chunk.logprobs)
        answer.served_by.CopyFrom(chunk.served_by)
        answer.request_id = chunk.request_id
        if chunk.finish_reason:
            answer.finish_reason = chunk.finish_reason
        if chunk.HasField("usage"):
            answer.usage.CopyFrom(chunk.usage)
    answer.text = "".join(texts)
    return answer


class RouteError(Exception):
    """The request ends with this gRPC status and message (and trailing metadata, if any)."""

    def __init__(self, code: grpc.StatusCode, message: str,
                 trailers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.trailers = trailers


@dataclass(frozen=True)
class ModelAvailability:
    name: str
    ready_replicas: int
    regions: list[str]


class _Watchdog:
    """Cancels an upstream call that stays silent too long (the per-attempt deadline): no first
    chunk within `first_s` of the call, or a gap of `stall_s` between chunks.

    One timer per attempt, never moved by a chunk: a chunk only records when it came, and the
    timer, when it goes off, fires only if the deadline that applies has passed; otherwise it
    re-arms for what is left."""

    def __init__(self, call: grpc.aio.UnaryStreamCall, first_s: float, stall_s: float) -> None:
        self._call = call
        self.fired = False
        self._first_s = first_s
        self._stall_s = stall_s
        self._started = time.monotonic()
        self._last: float | None = None  # time.monotonic() of the latest chunk
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(min(first_s, stall_s), self._check)

    @property
    def seconds(self) -> float:
        """The silence that applies now: before the first chunk, then between chunks."""
        return self._first_s if self._last is None else self._stall_s

    def chunk(self, now: float) -> None:
        """A chunk arrived at `now` (time.monotonic())."""
        self._last = now

    def _check(self) -> None:
        due = (self._started if self._last is None else self._last) + self.seconds
        left = due - time.monotonic()
        if left > 0:
            self._handle = self._loop.call_later(left, self._check)
            return
        self.fired = True
        self._call.cancel()

    def stop(self) -> None:
        self._handle.cancel()


#: Priority number -> name (the metrics label); unknown numbers are "INVALID".
_PRIORITY_NAMES = {v: common_pb2.Priority.Name(v) for v in common_pb2.Priority.values()}


def _metadata_value(metadata: Sequence[tuple[str, object]] | None, key: str) -> str:
    for k, v in metadata or ():
        if k.lower() == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return ""


class Dispatcher:
    def __init__(self, pool: BackendPool, router_id: str,
                 settings: DispatchSettings | None = None) -> None:
        self.settings = settings or DispatchSettings()
        self.settings.validate()
        s = self.settings
        self._pool = pool
        self.router_id = router_id
        self._policies: dict[str, Policy] = {}
        self._default_policy = self._policy_named(s.policy)
        self._model_policy = {m: self._policy_named(p) for m, p in s.model_policies}
        self._queue = AdmissionQueue(s.queue_size)
        self._budget = RetryBudget(s.retry_budget_ratio, s.retry_budget_floor,
                                   s.retry_budget_window_s)
        self._rng = random.Random()
        self._settings_cache: tuple[object, Settings] | None = None
        pool.on_change(self._queue.notify)
        pool.on_leave(self._forget)

    def _policy_named(self, name: str) -> Policy:
        if name not in self._policies:
            self._policies[name] = make_policy(name)
        return self._policies[name]

    def _forget(self, server_id: str) -> None:
        for policy in self._policies.values():
            policy.forget(server_id)

    def policy_for(self, model: str) -> Policy:
        return self._model_policy.get(model, self._default_policy)

    def routing_settings(self) -> Settings:
        """The RoutingPolicy record from etcd as Settings, rebuilt only when the record changes."""
        record = self._pool.policy_record
        cached = self._settings_cache
        if cached is None or cached[0] is not record:
            self._settings_cache = cached = (record, Settings.from_proto(record))
        return cached[1]

    def known_models(self) -> frozenset[str]:
        return self._pool.known_models()

    def models(self) -> list[ModelAvailability]:
        out = []
        for model in sorted(self.known_models()):
            backends = self._pool.candidates(model)
            out.append(ModelAvailability(model, len(backends),
                                         sorted({b.info.region for b in backends})))
        return out

    # --- the request path ---------------------------------------------------------------------

    async def stream(self, request: inference_pb2.GenerateRequest, timeout: float | None,
                     metadata: Sequence[tuple[str, object]] | None = None
                     ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        """Chunks of the answer; `timeout` is the client's remaining deadline in seconds and
        `metadata` the call's invocation metadata (for the session header)."""
        started = time.monotonic()
        priority = _PRIORITY_NAMES.get(request.priority, "INVALID")
        model = request.model if request.model in self.known_models() else "unknown"
        code = "OK"
        try:
            try:
                validate_generate(request)
            except ValueError as exc:
                raise RouteError(grpc.StatusCode.INVALID_ARGUMENT, str(exc)) from None
            deadline = None if timeout is None else started + timeout
            settings = self.routing_settings()
            session = request.session_id or _metadata_value(metadata, settings.session_header)
            policy = self.policy_for(request.model)
            route = RouteRequest(model=request.model, region=request.region or self.settings.region,
                                 zone=self.settings.zone, session=session,
                                 text=render(request.prompt, request.messages)
                                 if policy.uses_text else "")
            self._budget.request()
            queued = await self._admit(request, priority, deadline)
            request_id = request.request_id or uuid.uuid4().hex
            first = True
            async for chunk in self._attempts(request, policy, route, settings, request_id,
                                              started, queued, deadline):
                if first and chunk.token_ids:
                    metrics.child(metrics.TTFT, model).observe(time.monotonic() - started)
                    first = False
                yield chunk
        except RouteError as exc:
            code = exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            metrics.child(metrics.REQUESTS, model, code, priority).inc()
            metrics.child(metrics.DURATION, model).observe(time.monotonic() - started)

    def _no_candidates(self, model: str) -> RouteError:
        if model not in self.known_models():
            served = ", ".join(sorted(self.known_models())) or "none"
            return RouteError(grpc.StatusCode.NOT_FOUND,
                              f"model {model!r} is not served by this mesh (served models: {served})")
        return RouteError(grpc.StatusCode.UNAVAILABLE,
                          f"no server can take model {model!r} now (all draining or gone); "
                          "retry shortly")

    def _saturated(self, backends: Sequence[Backend]) -> bool:
        limit = self.settings.shed_utilization
        return bool(backends) and all(b.load().utilization >= limit for b in backends)

    async def _admit(self, request: inference_pb2.GenerateRequest, priority: str,
                     deadline: float | None) -> float:
        """Seconds spent queued. CRITICAL passes; SHEDDABLE is shed; STANDARD queues."""
        backends = self._pool.candidates(request.model)
        if not backends:
            raise self._no_candidates(request.model)
        if request.priority == common_pb2.PRIORITY_CRITICAL:
            return 0.0
        if not len(self._queue) and not self._saturated(backends):
            return 0.0
        model = request.model
        hint = self.settings.retry_after_ms
        trailers = (("retry-after-ms", str(hint)),)
        if request.priority == common_pb2.PRIORITY_SHEDDABLE:
            metrics.SHED.labels(model, priority, "saturated").inc()
            raise RouteError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                             f"every server for model {model!r} is saturated and the request is "
                             f"SHEDDABLE; retry after {hint} ms", trailers)
        wait = (self.settings.queue_timeout_s if deadline is None
                else max(0.0, deadline - time.monotonic()))
        metrics.QUEUED.inc()
        try:
            waited = await self._queue.wait(
                lambda: not self._saturated(self._pool.candidates(model)), wait)
        except QueueFull as exc:
            metrics.SHED.labels(model, priority, "queue_full").inc()
            raise RouteError(grpc.StatusCode.UNAVAILABLE,
                             f"every server for model {model!r} is saturated and {exc}; retry "
                             f"after {hint} ms", trailers) from None
        except QueueTimeout as exc:
            metrics.SHED.labels(model, priority, "queue_timeout").inc()
            if deadline is not None:
                raise RouteError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                 f"deadline passed while queued: every server for model "
                                 f"{model!r} stayed saturated ({exc})") from None
            raise RouteError(grpc.StatusCode.UNAVAILABLE,
                             f"every server for model {model!r} stayed saturated ({exc}); retry "
                             f"after {hint} ms", trailers) from None
        finally:
            metrics.QUEUED.dec()
        metrics.QUEUE_WAIT.labels(model).observe(waited)
        return waited

    def _backoff(self, failures: int) -> float:
        s = self.settings
        return min(s.backoff_max_s, s.backoff_base_s * 2 ** (failures - 1)) * (
            0.5 + self._rng.random() / 2)

    async def _attempts(self, request: inference_pb2.GenerateRequest, policy: Policy,
                        route: RouteRequest, settings: Settings, request_id: str, started: float,
                        queued: float, deadline: float | None
                        ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        s = self.settings
        model = request.model
        base = modelserver_pb2.ModelServerServiceGenerateRequest(
            request_id=request_id, model=model, prompt=request.prompt,
            messages=request.messages, sampling=request.sampling, priority=request.priority)
        max_tokens = request.sampling.max_tokens or DEFAULT_MAX_TOKENS
        relayed: list[int] = []  # token ids the client already has
        streamed = False  # any chunk reached the client
        tried: set[str] = set()
        failures = migrations = 0
        last_error = "no server could be tried"
        issued = False
        while True:
            candidates = self._pool.candidates(model)
            if not candidates:
                raise self._no_candidates(model)
            pick = policy.pick(candidates, route, settings, exclude=tried)
            if pick is None:
                break
            backend = pick.endpoint
            tried.add(backend.server_id)
            metrics.child(metrics.PICKS, backend.server_id, pick.reason).inc()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise RouteError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed while routing")
            upstream = resume_request(base, relayed) if relayed else base
            resumed = len(relayed)
            backend.outstanding += 1
            policy.sent(backend.server_id, route)
            call = backend.stub.Generate(upstream, timeout=remaining)
            if not issued:
                metrics.OVERHEAD_ROUTE.observe(time.monotonic() - started - queued)
                issued = True
            watchdog = _Watchdog(call, s.first_token_timeout_s, s.stall_timeout_s)
            template = self._template(backend, request_id)
            code: grpc.StatusCode | None = None
            details = ""
            try:
                async for part in call:
                    received = time.monotonic()
                    watchdog.chunk(received)
                    out = self._wrap(part, template, backend, resumed)
                    relayed.extend(part.token_ids)
                    metrics.OVERHEAD_RELAY.observe(time.monotonic() - received)
                    streamed = True
                    yield out
                backend.record_success()
                return
            except grpc.aio.AioRpcError as exc:
                code, details = exc.code(), exc.details() or ""
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not watchdog.fired or (task is not None and task.cancelling()):
                    raise
                details = (f"no {'token' if not streamed else 'further token'} within "
                           f"{watchdog.seconds:g}s")
            finally:
                watchdog.stop()
                backend.outstanding -= 1
                if not call.done():
                    call.cancel()
                self._queue.notify()
            # The attempt failed: decide between retry, migration and giving up.
            stalled = code is None
            if stalled or code in SERVER_FAULTS:
                backend.record_failure()
            what = "stalled" if code is None else code.name
            last_error = f"{backend.server_id}: {what}: {details}"
            if streamed:
                if not stalled and code not in MIGRATABLE:
                    raise self._final_error(code, details, backend)
                if len(relayed) >= max_tokens:  # everything arrived but the closing chunk
                    yield self._closing_chunk(backend, request_id, len(relayed))
                    return
                if migrations >= s.max_migrations:
                    raise RouteError(grpc.StatusCode.UNAVAILABLE,
                                     f"the stream broke {migrations + 1} times; last: {last_error}")
                if not self._budget.try_spend():
                    metrics.RETRY_BUDGET_EXHAUSTED.labels(model).inc()
                    raise RouteError(grpc.StatusCode.UNAVAILABLE,
                                     f"stream broke ({last_error}) and the router's retry budget "
                                     "is spent (many failures); retry later")
                migrations += 1
                metrics.MIGRATIONS.labels(model).inc()
                log.info("migrating %s after %d tokens: %s", request_id, len(relayed), last_error)
                continue
            if not stalled and code not in RETRYABLE:
                raise self._final_error(code, details, backend)
            failures += 1
            if failures >= s.max_attempts:
                break
            if not self._budget.try_spend():
                metrics.RETRY_BUDGET_EXHAUSTED.labels(model).inc()
                raise RouteError(grpc.StatusCode.UNAVAILABLE,
                                 f"attempt failed ({last_error}) and the router's retry budget is "
                                 "spent (many failures); retry later")
            metrics.RETRIES.labels(model).inc()
            log.info("attempt %d for %s failed before the first token (%s); retrying",
                     failures, request_id, last_error)
            pause = self._backoff(failures)
            if deadline is not None:
                pause = min(pause, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(pause)
        raise RouteError(grpc.StatusCode.UNAVAILABLE,
                         f"every attempt failed for model {model!r}; last error: {last_error}")

    @staticmethod
    def _final_error(code: grpc.StatusCode, details: str, backend: Backend) -> RouteError:
        if code in PASS_THROUGH:
            return RouteError(code, details)
        return RouteError(grpc.StatusCode.UNAVAILABLE,
                          f"server {backend.server_id} failed: {code.name}: {details}")

    def _closing_chunk(self, backend: Backend, request_id: str, tokens: int
                       ) -> inference_pb2.GenerateResponse:
        out = self._template(backend, request_id)
        out.finish_reason = common_pb2.FINISH_REASON_LENGTH
        out.usage.completion_tokens = tokens
        return out

    def _template(self, backend: Backend, request_id: str) -> inference_pb2.GenerateResponse:
        """What every chunk of one attempt shares: the request id and `served_by`."""
        out = inference_pb2.GenerateResponse(request_id=request_id)
        sb = out.served_by
        sb.server_id = backend.server_id
        sb.region = backend.info.region
        sb.zone = backend.info.zone
        sb.router_id = self.router_id
        sb.simulated = backend.info.simulated
        sb.backend = backend.info.backend
        return out

    @staticmethod
    def _wrap(part: modelserver_pb2.ModelServerServiceGenerateResponse,
              template: inference_pb2.GenerateResponse, backend: Backend, resumed: int
              ) -> inference_pb2.GenerateResponse:
        out = inference_pb2.GenerateResponse()
        out.CopyFrom(template)
        out.text = part.text
        out.token_ids.extend(part.token_ids)
        if part.logprobs:
            out.logprobs.extend(part.logprobs)
        out.finish_reason = part.finish_reason
        if part.HasField("usage"):
            out.usage.CopyFrom(client_usage(part.usage, backend.info.backend, resumed))
        return out
