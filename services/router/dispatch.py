"""The router's request path, whatever public API received the request.

InferenceService and the KServe v2 servicer validate a request into a ValidRequest and call
`Dispatcher.stream`. A name with a traffic policy (or a version alias) goes through
traffic/executor.py, which resolves it to deployments and calls `serve` for each; any other name
is served directly. `serve` is one deployment's path: admission by priority (shedding and queueing when every replica is
saturated), a pick through the routing policy, then attempts (attempt.py does one; decide.py says
what follows it; this module applies that: relay, retry, migrate, close or fail). Failures are
services/common/errors.py's; the status interceptor maps them.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass

from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import inference_pb2, modelserver_pb2

from services.common import tracing
from services.common.errors import DeadlineExceeded, NotFound, ServiceError, Unavailable
from services.common.validation import ValidRequest

from . import metrics, spans
from .admission import Admission
from .attempt import Attempt
from .config import DispatchSettings
from .convert import closing_chunk, template, upstream_request, with_resume
from .decide import Action, Decision, Progress, decide
from .policy import Policy, RouteRequest, Settings, make_policy
from .policy.prefix import render
from .pool import BackendPool
from .replica import Replica
from .retry_budget import RetryBudget
from .stats import RouterStats
from .traffic.call import Call
from .traffic.executor import TrafficExecutor
from .traffic.stats import CanaryRecorder, Observer
from .traffic.table import TrafficTable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelAvailability:
    name: str
    ready_replicas: int
    regions: list[str]


def _metadata_value(metadata: Sequence[tuple[str, object]] | None, key: str) -> str:
    for k, v in metadata or ():
        if k.lower() == key:
            return v.decode(errors="replace") if isinstance(v, bytes) else str(v)
    return ""


@dataclass
class _Request:
    """One request's state across its attempts."""

    req: ValidRequest
    request_id: str
    route: RouteRequest
    policy: Policy
    settings: Settings
    deadline: float | None
    relayed: list[int]  # token ids the client has (a client's resume included)
    streamed: bool = False  # a chunk reached the client
    failures: int = 0
    migrations: int = 0
    observer: Observer | None = None  # a canary side's figures (traffic/stats.py)
    span: tracing.Span = tracing.NOOP  # router.request (spans.py)


class Dispatcher:
    def __init__(self, pool: BackendPool, router_id: str, settings: DispatchSettings | None = None,
                 traffic: TrafficTable | None = None, recorder: CanaryRecorder | None = None) -> None:
        self.settings = settings or DispatchSettings()
        self.settings.validate()
        s = self.settings
        self._pool = pool
        self.router_id = router_id
        self._policies: dict[str, Policy] = {}
        self._default_policy = self._policy_named(s.policy)
        self._model_policy = {m: self._policy_named(p) for m, p in s.model_policies}
        self._admission = Admission(pool.candidates, s.shed_utilization, s.queue_size, s.queue_timeout_s,
                                    s.retry_after_ms)
        self._budget = RetryBudget(s.retry_budget_ratio, s.retry_budget_floor, s.retry_budget_window_s)
        self._rng = random.Random()
        self.stats = RouterStats()  # demand figures for the control plane's autoscaler
        self._settings_cache: tuple[cp.RoutingPolicy | None, Settings] | None = None
        self._counted: set[str] = set()  # models whose metrics start at zero (metrics.init_model)
        pool.on_change(self._admission.notify)
        pool.on_leave(self._forget)
        pool.on_kv_events(self._kv_events)
        self._known_cache: tuple[frozenset[str], frozenset[str], frozenset[str]] | None = None
        self.traffic = None if traffic is None else TrafficExecutor(
            traffic, self.serve, pool.candidates, recorder, s.retry_after_ms, wakes=pool.scales_from_zero)

    @property
    def admission(self) -> Admission:
        return self._admission

    def _policy_named(self, name: str) -> Policy:
        if name not in self._policies:
            self._policies[name] = make_policy(name)
        return self._policies[name]

    def _forget(self, replica_id: str) -> None:
        for policy in self._policies.values():
            policy.forget(replica_id)
        metrics.forget_replica(replica_id)

    def _kv_events(self, replica_id: str, msg: modelserver_pb2.KvEvents,
                   fetch_tokenizer: Callable[[], Awaitable[modelserver_pb2.GetTokenizerResponse]]) -> bool:
        return all([policy.kv_events(replica_id, msg, fetch_tokenizer) for policy in self._policies.values()])

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
        """Deployments, plus the names traffic policies and version aliases answer to."""
        known = self._pool.known_models()
        if self.traffic is None:
            return known
        names = self.traffic.table.names()
        cached = self._known_cache
        if cached is None or cached[0] is not known or cached[1] is not names:
            self._known_cache = cached = (known, names, known | names)
        return cached[2]

    def _reachable(self, name: str) -> list[Replica]:
        if self.traffic is None or not self.traffic.handles(name):
            return self._pool.candidates(name)
        return [r for m in sorted(self.traffic.deployments(name)) for r in self._pool.candidates(m)]

    def models(self) -> list[ModelAvailability]:
        out = []
        for model in sorted(self.known_models()):
            replicas = self._reachable(model)
            out.append(ModelAvailability(model, len(replicas), sorted({r.region for r in replicas})))
        return out

    # --- the request path ---------------------------------------------------------------------

    async def stream(self, req: ValidRequest, timeout: float | None,
                     metadata: Sequence[tuple[str, object]] | None = None
                     ) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """Chunks of the answer; `timeout` is the client's remaining deadline in seconds and
        `metadata` the call's invocation metadata (for the session header)."""
        started = time.monotonic()
        deadline = None if timeout is None else started + timeout
        model = req.model if req.model in self.known_models() else "unknown"
        if model not in self._counted:
            self._counted.add(model)
            metrics.init_model(model)
        code = "OK"
        span = spans.request_span(req, metadata, self.router_id)
        try:
            if self.traffic is not None and self.traffic.handles(req.model):
                session = req.session_id or _metadata_value(metadata, self.routing_settings().session_header)
                chunks = self.traffic.run(req, Call(metadata, deadline, session[:256],
                                                    req.region or self.settings.region))
            else:
                chunks = self.serve(req, deadline, metadata, span=span)
            first = True
            async with aclosing(chunks):
                async for chunk in chunks:
                    if first and chunk.token_ids:
                        metrics.child(metrics.TTFT, model).observe(time.monotonic() - started)
                        first = False
                    yield chunk
        except ServiceError as exc:
            code = exc.code.name
            raise
        except (asyncio.CancelledError, GeneratorExit):
            code = "CANCELLED"
            raise
        finally:
            metrics.child(metrics.REQUESTS, model, code, req.priority.name).inc()
            metrics.child(metrics.DURATION, model).observe(time.monotonic() - started)
            if code != "OK":
                span.fail(code)
            span.end()

    async def serve(self, req: ValidRequest, deadline: float | None,
                    metadata: Sequence[tuple[str, object]] | None = None,
                    observer: Observer | None = None,
                    span: tracing.Span = tracing.NOOP) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        """One deployment's path: admission, pick, attempts. `deadline` is on time.monotonic();
        `observer` (a canary side) hears of every attempt and the first token; `span` is the
        request's trace span (its route and attempt spans hang under it). The deployment's demand
        (arrivals, in flight, time to first token) is counted for the autoscaler."""
        started = time.monotonic()
        counted = req.model in self._pool.known_models()
        if counted:
            self.stats.arrived(req.model)
        activation = 0.0
        if not self._pool.candidates(req.model):
            activation = await self._activate(req, deadline)
        state = self._start(req, deadline, metadata)
        state.observer, state.span = observer, span
        span.set("meshserve.request_id", state.request_id)
        self._budget.request()
        queued = await self._admission.admit(req.model, req.priority, state.deadline)
        spans.queued(span, queued)
        if counted:
            self.stats.started(req.model)
        first = True
        try:
            async with aclosing(self._attempts(state, started + activation + queued)) as chunks:
                async for chunk in chunks:
                    if first and chunk.token_ids:
                        first = False
                        if counted:
                            self.stats.first_token(req.model, time.monotonic() - started)
                        if observer is not None:
                            observer.first_token(time.monotonic() - started)
                    chunk.served_by.deployment = req.model
                    yield chunk
        finally:
            if counted:
                self.stats.finished(req.model)

    def _start(self, req: ValidRequest, deadline: float | None,
               metadata: Sequence[tuple[str, object]] | None) -> _Request:
        settings = self.routing_settings()
        session = req.session_id or _metadata_value(metadata, settings.session_header)
        policy = self.policy_for(req.model)
        route = RouteRequest(model=req.model, region=req.region or self.settings.region, zone=self.settings.zone,
                             session=session[:256],
                             text=render(req.prompt or "", req.messages or ()) if policy.uses_text else "",
                             prompt=req.prompt or "", messages=req.messages or (), tenant=req.tenant,
                             share_system_prompt=req.share_system_prompt)
        return _Request(req=req, request_id=req.request_id or uuid.uuid4().hex, route=route, policy=policy,
                        settings=settings, deadline=deadline, relayed=list(req.resume_token_ids))

    async def _activate(self, req: ValidRequest, deadline: float | None) -> float:
        """No replica is ready. A model that scales to zero waits (bounded, with its deadline)
        while the control plane places one; any other model gets its answer at once. Returns the
        seconds waited."""
        if not self._pool.scales_from_zero(req.model):
            raise self._no_candidates(req.model)
        return await self._admission.wait_for_replica(req.model, deadline,
                                                      self.settings.activation_timeout_s)

    def _no_candidates(self, model: str) -> ServiceError:
        if model not in self.known_models():
            served = ", ".join(sorted(self.known_models())) or "none"
            return NotFound(f"model {model!r} is not served by this mesh (served models: {served})")
        return Unavailable(f"no replica can take model {model!r} now (all draining or gone); retry shortly",
                           retry_after_ms=self.settings.retry_after_ms)

    def _pick(self, state: _Request, tried: set[str]) -> Replica | None:
        replicas = self._pool.candidates(state.req.model)
        if not replicas:
            if tried:  # the model was served a moment ago: retryable, never NOT_FOUND mid-request
                raise Unavailable(f"no replica of model {state.req.model!r} is available now; retry shortly",
                                  retry_after_ms=self.settings.retry_after_ms)
            raise self._no_candidates(state.req.model)
        started_ns = time.time_ns() if state.span.recording else 0
        pick = state.policy.pick(replicas, state.route, state.settings, exclude=tried)
        if pick is None:
            return None
        metrics.child(metrics.PICKS, pick.endpoint.server_id, pick.reason).inc()
        spans.routed(state.span, started_ns, pick.endpoint, pick.reason, len(replicas))
        return pick.endpoint

    def _remaining(self, state: _Request) -> float | None:
        if state.deadline is None:
            return None
        remaining = state.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the deadline passed while routing")
        return remaining

    async def _attempts(self, state: _Request,
                        admitted: float) -> AsyncGenerator[inference_pb2.GenerateResponse, None]:
        s, model = self.settings, state.req.model
        base = upstream_request(state.req, state.request_id)
        tried: set[str] = set()
        last = "no replica could be tried"
        while True:
            replica = self._pick(state, tried)
            if replica is None:
                raise Unavailable(f"every replica of model {model!r} was tried; last: {last}")
            tried.add(replica.server_id)
            head = template(replica, self.router_id, state.request_id)
            span = spans.attempt_span(state.span, replica, len(tried), len(state.relayed))
            attempt = Attempt(replica, with_resume(base, state.relayed) if state.relayed else base, head,
                              self._remaining(state), s.first_token_timeout_s, s.stall_timeout_s,
                              span.headers())
            state.policy.sent(replica.replica_id, state.route)
            if len(tried) == 1:
                metrics.OVERHEAD_ROUTE.observe(time.monotonic() - admitted)
            try:
                async with aclosing(attempt.relay()) as chunks:
                    async for chunk in chunks:
                        state.streamed = True
                        yield chunk
            finally:
                state.relayed.extend(attempt.token_ids)
                self._admission.notify()
                metrics.child(metrics.ATTEMPTS, model, replica.server_id, attempt.outcome.label()).inc()
                spans.end_attempt(span, attempt.outcome)
            last = f"{replica.server_id}: {attempt.outcome.describe()}"
            decision = decide(attempt.outcome, self._progress(state), replica.server_id, last)
            if state.observer is not None:
                state.observer.attempt(decision.server_fault)
            if decision.server_fault:
                replica.record_failure()
            elif attempt.outcome.done:
                replica.record_success()
            if decision.action is Action.DONE:
                return
            if decision.action is Action.CLOSE:
                yield closing_chunk(head, len(state.relayed))
                return
            if decision.error is not None:
                raise decision.error
            if not self._untried(state, tried):  # fail now: a backoff could not change that
                raise Unavailable(f"every replica of model {model!r} was tried; last: {last}",
                                  retry_after_ms=s.retry_after_ms)
            await self._before_next(state, decision, last)

    def _untried(self, state: _Request, tried: set[str]) -> bool:
        return any(r.server_id not in tried for r in self._pool.candidates(state.req.model))

    def _progress(self, state: _Request) -> Progress:
        s = self.settings
        return Progress(relayed=len(state.relayed), streamed=state.streamed,
                        max_tokens=state.req.sampling.max_tokens, failures=state.failures,
                        migrations=state.migrations, max_attempts=s.max_attempts, max_migrations=s.max_migrations)

    async def _before_next(self, state: _Request, decision: Decision, last: str) -> None:
        """Spend the retry budget for a retry or migration, count it, and back off a retry."""
        model = state.req.model
        if not self._budget.try_spend(decision.budget_key):
            metrics.RETRY_BUDGET_EXHAUSTED.labels(model).inc()
            raise Unavailable(f"{last}; the router's retry budget is spent (many failures): retry later",
                              retry_after_ms=self.settings.retry_after_ms)
        if decision.action is Action.MIGRATE:
            state.migrations += 1
            metrics.MIGRATIONS.labels(model).inc()
            log.info("migrating %s after %d tokens: %s", state.request_id, len(state.relayed), last)
            return
        state.failures += 1
        metrics.RETRIES.labels(model).inc()
        log.info("attempt %d for %s failed before the first token (%s); retrying", state.failures,
                 state.request_id, last)
        pause = self._backoff(state.failures)
        if state.deadline is not None:
            pause = min(pause, max(0.0, state.deadline - time.monotonic()))
        await asyncio.sleep(pause)

    def _backoff(self, failures: int) -> float:
        s = self.settings
        return min(s.backoff_max_s, s.backoff_base_s * 2 ** (failures - 1)) * (0.5 + self._rng.random() / 2)
