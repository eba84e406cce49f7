"""The router's part of a request's trace: `router.request` (continuing the caller's
traceparent), `router.queue` (admission wait), `router.route` per pick and `router.attempt` per
upstream call, whose traceparent the model server continues.

Each helper returns at once when tracing is off, so the request path pays a flag check and no
allocations for it. Attributes are ids, counts and outcomes, never prompt text.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.common import tracing
from services.common.validation import ValidRequest

from .attempt import Outcome
from .replica import Replica


def request_span(req: ValidRequest, metadata: Sequence[tuple[str, object]] | None,
                 router_id: str) -> tracing.Span:
    if not tracing.enabled():
        return tracing.NOOP
    pairs = [(str(k), v) for k, v in metadata or () if isinstance(v, str | bytes)]
    return tracing.server_span("router.request", pairs, attributes={
        "gen_ai.request.model": req.model, "meshserve.router": router_id, "meshserve.priority": req.priority.name,
        "gen_ai.request.max_tokens": req.sampling.max_tokens,
        "meshserve.resumed_tokens": len(req.resume_token_ids)})


def queued(span: tracing.Span, seconds: float) -> None:
    """The wait in the router's admission queue, ending now."""
    if span.recording and seconds > 0:
        now = time.time_ns()
        span.record("router.queue", now - int(seconds * 1e9), now)


def routed(span: tracing.Span, started_ns: int, replica: Replica, reason: str, candidates: int) -> None:
    """One pick by the routing policy, from `started_ns` to now."""
    if span.recording:
        span.record("router.route", started_ns, attributes={
            "meshserve.server": replica.server_id, "meshserve.pick_reason": reason,
            "meshserve.candidates": candidates})


def attempt_span(parent: tracing.Span, replica: Replica, number: int, resumed: int) -> tracing.Span:
    """The span of one upstream call; its `headers()` go out with the call."""
    if not parent.recording:
        return tracing.NOOP
    return parent.child("router.attempt", client=True, attributes={
        "meshserve.server": replica.server_id, "meshserve.attempt": number,
        "meshserve.resumed_tokens": resumed, "rpc.system": "grpc",
        "rpc.method": "meshserve.v1.ModelServerService/Generate"})


def end_attempt(span: tracing.Span, outcome: Outcome) -> None:
    if not span.recording:
        return
    span.set("meshserve.relayed_tokens", outcome.tokens)
    if outcome.abandoned:
        span.set("meshserve.abandoned", outcome.abandoned)
        span.fail("ABANDONED")
    elif outcome.code is not None:
        span.fail(outcome.code.name)
    span.end()
