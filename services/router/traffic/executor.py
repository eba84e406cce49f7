"""Serving a name through its traffic policy: resolve, choose, and hand deployments to the
dispatcher's ordinary path (admission, pick, attempts, retries, migration).

- split / canary: one target by weight among those with a READY replica (a target without one gets
  no traffic; its share goes to the others; never a 503 because of a split); a session hashes to
  the same target on every router. When no target has one, targets whose deployments scale from
  zero (autoscaling) are chosen by weight instead: the request waits in the router's activation
  queue while the leader places a replica, and its arrival is the demand that wakes the target.
  Fallback chains and version aliases likewise wake their first such link or version. A canary's
  weight is the leader's step; its requests report figures (stats.py) for the leader to judge.
- rules: the first matching rule's target, else the default (rules.py).
- fallback: links in order, with the same deadline. UNAVAILABLE, RESOURCE_EXHAUSTED, NOT_FOUND
  (no ready replica) or no first chunk within the policy's first-token timeout moves the request
  on - before any chunk reached the client, or after it when the links serve the same weights
  (`resume_across_links`: the next link continues after the tokens the client has).
- ensemble: ensemble.py.
Each chunk's `served_by.route` says the way taken, e.g. "chat[rule:long]>big[split]>big@v2".
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import replace

import grpc
from meshserve.v1 import common_pb2, inference_pb2
from meshserve.v1 import traffic_pb2 as tp

from services.common.errors import ServiceError, Unavailable
from services.common.traffic.graph import MAX_DEPTH
from services.common.traffic.records import Canary, Ensemble, Fallback, Policy, Rules, Split
from services.common.validation import ValidRequest

from . import choose, rules
from .call import Call, Chunks, prompt_text
from .ensemble import run_ensemble
from .stats import CanaryRecorder, Observer
from .table import TrafficTable

log = logging.getLogger(__name__)

#: Failures that move a request to the next link of a fallback chain.
FALLBACK_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED,
                            grpc.StatusCode.NOT_FOUND})
Serve = Callable[[ValidRequest, float | None, Sequence[tuple[str, object]] | None, Observer | None], Chunks]


class TrafficExecutor:
    def __init__(self, table: TrafficTable, serve: Serve, candidates: Callable[[str], Sequence[object]],
                 recorder: CanaryRecorder | None = None, retry_after_ms: int = 1000,
                 rng: random.Random | None = None, wakes: Callable[[str], bool] | None = None) -> None:
        self.table = table
        self._serve = serve
        self._candidates = candidates
        self._wakes = wakes or (lambda model: False)  # a deployment that scales from zero
        self.recorder = recorder
        self._retry_after_ms = retry_after_ms
        self._rng = rng or random.Random()

    def handles(self, name: str) -> bool:
        return self.table.handles(name)

    # --- what is reachable now -----------------------------------------------------------------

    def _leaf_available(self, model: str) -> bool:
        return bool(self._candidates(model))

    def ready_or_wakes(self, model: str) -> bool:
        return self._leaf_available(model) or self._wakes(model)

    def available(self, target: str, depth: int = 0, leaf: Callable[[str], bool] | None = None) -> bool:
        """Whether the target has a READY replica to serve from, through its policies (with
        `leaf=self.ready_or_wakes`: or a deployment that a request wakes from zero)."""
        leaf = leaf or self._leaf_available
        if depth > MAX_DEPTH:
            return False
        policy = self.table.policy(target)
        if policy is None:
            versions = self.table.versions(target)
            return any(map(leaf, versions or [target]))
        spec = policy.spec
        if isinstance(spec, Ensemble):
            return sum(self.available(m.target, depth + 1, leaf) for m in spec.members) >= spec.quorum
        if isinstance(spec, Canary) and self.table.canary(policy).phase == tp.CANARY_PHASE_ROLLED_BACK:
            return self.available(spec.stable, depth + 1, leaf)
        return any(self.available(t, depth + 1, leaf) for t in policy.targets())

    def deployments(self, target: str, depth: int = 0) -> set[str]:
        """The deployments a target can reach (ListModels counts their replicas)."""
        policy = self.table.policy(target)
        if policy is None or depth > MAX_DEPTH:
            return set(self.table.versions(target) or [target])
        return set().union(*(self.deployments(t, depth + 1) for t in policy.targets()))

    # --- serving -------------------------------------------------------------------------------

    async def run(self, req: ValidRequest, call: Call) -> Chunks:
        async with aclosing(self.serve_target(req.model, req, call, "", 0, None)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def serve_target(self, target: str, req: ValidRequest, call: Call, route: str, depth: int,
                           observer: Observer | None) -> Chunks:
        """Chunks of `req` served through `target`; `route` is the way taken so far."""
        policy = self.table.policy(target)
        if policy is None:
            async with aclosing(self._leaf(target, req, call, route, observer)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        if depth >= MAX_DEPTH:
            raise Unavailable(f"traffic policy {target!r} nests more than {MAX_DEPTH} policies deep")
        spec = policy.spec
        if isinstance(spec, Fallback):
            gen = self._fallback(policy, spec, req, call, route, depth, observer)
        elif isinstance(spec, Ensemble):
            gen = run_ensemble(self.serve_target, policy, spec, req, call, route, depth)
        else:
            child, how, observer = self._choose(policy, req, call, depth, observer)
            gen = self.serve_target(child, req, call, f"{route}{policy.name}[{how}]>", depth + 1, observer)
        async with aclosing(gen) as chunks:
            async for chunk in chunks:
                yield chunk

    async def _leaf(self, target: str, req: ValidRequest, call: Call, route: str,
                    observer: Observer | None) -> Chunks:
        model = self.table.concrete(target, self._leaf_available)
        if not self._leaf_available(model):
            model = self.table.concrete(target, self.ready_or_wakes)
        if model != target:
            route = f"{route}{target}[alias]>"
        path = f"{route}{model}" if route else ""
        leaf = req if model == req.model else replace(req, model=model)
        async with aclosing(self._serve(leaf, call.deadline, call.metadata, observer)) as chunks:
            async for chunk in chunks:
                chunk.served_by.route = path
                yield chunk

    def _choose(self, policy: Policy, req: ValidRequest, call: Call, depth: int,
                observer: Observer | None) -> tuple[str, str, Observer | None]:
        """(target, how it was chosen, the observer its leaf reports to) for split, canary, rules."""
        spec = policy.spec
        if isinstance(spec, Rules):
            inp = rules.RuleInput(call.headers, call.region, prompt_text(req), int(req.priority))
            target, rule = rules.choose(spec, inp)
            return target, f"rule:{rule}", observer
        if isinstance(spec, Split):
            return self._weighted(policy, list(spec.targets), set(), call, depth), "split", observer
        assert isinstance(spec, Canary)
        view = self.table.canary(policy)
        rolled_back = {spec.canary} if view.phase == tp.CANARY_PHASE_ROLLED_BACK else set()
        options = [(spec.stable, 100 - view.weight), (spec.canary, view.weight)]
        target = self._weighted(policy, options, rolled_back, call, depth)
        side = "canary" if target == spec.canary else "stable"
        if self.recorder is not None:
            observer = self.recorder.observer(policy.name, view.generation, view.step, spec.window_s, side)
        return target, side, observer

    def _weighted(self, policy: Policy, options: list[tuple[str, int]], never: set[str], call: Call,
                  depth: int) -> str:
        """By weight among targets with a READY replica; when no weighted one has any, any ready
        target (weight 0 included, never a rolled-back canary); when none is ready, those that wake
        from zero, the same way."""
        ready = [(t, w) for t, w in options if t not in never and self.available(t, depth + 1)]
        if not ready:
            ready = [(t, w) for t, w in options if t not in never and self.available(t, depth + 1, self.ready_or_wakes)]
        key = f"{policy.name}\x00{call.session}" if call.session else ""
        chosen = choose.pick(ready, key, self._rng) or choose.pick([(t, 1) for t, _ in ready], key, self._rng)
        if chosen is None:
            raise Unavailable(f"no target of {policy.kind} {policy.name!r} has a ready replica now "
                              f"({', '.join(t for t, _ in options)}); retry shortly",
                              retry_after_ms=self._retry_after_ms)
        return chosen

    async def _fallback(self, policy: Policy, spec: Fallback, req: ValidRequest, call: Call, route: str,
                        depth: int, observer: Observer | None) -> Chunks:
        tokens: list[int] = []
        streamed = False
        failures: list[str] = []
        last: ServiceError | None = None
        # When no link is ready, the links that wake from zero are tried, in order.
        waking = not any(self.available(link, depth + 1) for link in spec.links)
        for i, link in enumerate(spec.links):
            if not self.available(link, depth + 1, self.ready_or_wakes if waking else None):
                failures.append(f"{link}: no ready replica")
                continue
            link_req = req
            if tokens:
                resume = (*req.resume_token_ids, *tokens)
                if len(resume) >= req.sampling.max_tokens:
                    yield _closing(req, len(resume))
                    return
                link_req = replace(req, resume_token_ids=resume)
            chunks = self.serve_target(link, link_req, call, f"{route}{policy.name}[fallback:{i}]>", depth + 1,
                                       observer)
            try:
                async with aclosing(_first_within(chunks, None if streamed else spec.first_token_timeout_s)) as relay:
                    async for chunk in relay:
                        streamed = True
                        tokens.extend(chunk.token_ids)
                        yield chunk
                return
            except ServiceError as exc:
                if exc.code not in FALLBACK_CODES or (streamed and not spec.resume_across_links):
                    raise
                last = exc
                failures.append(f"{link}: {exc.code.name}: {exc.message[:200]}")
                log.info("fallback %s: link %d (%s) failed (%s); trying the next", policy.name, i, link,
                         failures[-1])
        message = f"every link of fallback {policy.name!r} failed: " + "; ".join(failures)
        if last is not None and last.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise ServiceError.of(last.code, message, last.trailers)
        raise Unavailable(message, retry_after_ms=self._retry_after_ms)


class FirstTokenTimeout(Unavailable):
    """A fallback link produced nothing within the policy's first-token timeout."""


async def _first_within(chunks: Chunks, timeout: float | None) -> Chunks:
    """The chunks, failing with FirstTokenTimeout when the first takes longer than `timeout`
    (the wait is cancelled, which ends the link's attempt like a client going away)."""
    async with aclosing(chunks):
        if timeout is not None:
            try:
                async with asyncio.timeout(timeout):
                    first = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise FirstTokenTimeout(f"no first token within {timeout:g}s") from None
            yield first
        async for chunk in chunks:
            yield chunk


def _closing(req: ValidRequest, completion_tokens: int) -> inference_pb2.GenerateResponse:
    """Every token the client asked for had arrived when the link broke: end the stream."""
    out = inference_pb2.GenerateResponse(request_id=req.request_id,
                                         finish_reason=common_pb2.FINISH_REASON_LENGTH)
    out.usage.completion_tokens = completion_tokens
    return out
