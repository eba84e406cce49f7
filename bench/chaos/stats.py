"""One phase's requests summed up: failures with their reasons, token accounting, latency."""

from __future__ import annotations

from collections import Counter

from bench.router.common import pct

from .record import Record

#: Failure reasons kept in full in the results (the rest are counted by status).
MAX_LISTED = 50


def _dist(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"p50": round(pct(values, 50), 3), "p99": round(pct(values, 99), 3),
            "max": round(max(values), 3)}


def summarize(records: list[Record]) -> dict:
    """Counts over every request of a phase. `failed` = ended with an error status;
    `no_final_status` = neither an error nor a finish reason when the phase's grace ran out
    (or a stream that ended OK without a finish reason); lost / duplicated / reordered tokens
    over every answer (a failed answer is judged up to the furthest token it received)."""
    failed = [r for r in records if r.error is not None]
    no_final = [r for r in records if not r.done]
    checks = [(r, r.check()) for r in records]
    inexact = [r for r, c in checks if r.done and r.error is None and not (c.exact and r.usage_ok())]
    reasons = Counter(f"{r.error[0]}: {r.error[1]}" for r in failed if r.error)
    return {
        "requests": len(records),
        "streaming": sum(r.kind == "stream" for r in records),
        "unary": sum(r.kind == "unary" for r in records),
        "completed_exact": sum(1 for r, c in checks if r.done and r.error is None and c.exact
                               and r.usage_ok()),
        "failed": len(failed),
        "failed_by_status": dict(Counter(r.error[0] for r in failed if r.error)),
        "failure_reasons": [{"request_id": r.request_id, "status": r.error[0], "message": r.error[1],
                             "tokens_received": len(r.token_ids), "resumes": r.resumes}
                            for r in failed[:MAX_LISTED] if r.error],
        "failure_reason_counts": dict(reasons.most_common(20)),
        "no_final_status": len(no_final),
        "ended_ok_without_finish_reason": sum(1 for r in no_final if r.ended_at is not None),
        "no_final_status_ids": [r.request_id for r in no_final[:MAX_LISTED]],
        "lost_tokens": sum(c.lost for _, c in checks),
        "duplicated_tokens": sum(c.duplicated for _, c in checks),
        "reordered_tokens": sum(c.reordered for _, c in checks),
        "foreign_tokens": sum(c.foreign for _, c in checks),
        "inexact_answers": len(inexact),
        "inexact_ids": [r.request_id for r in inexact[:MAX_LISTED]],
        "unknown_status": sum(1 for r in failed if r.error and r.error[0] == "UNKNOWN"),
        "client_resumes": sum(r.resumes for r in records),
        "requests_resumed": sum(1 for r in records if r.resumes),
        "server_moves": sum(sum(1 for a, b in zip(r.segments, r.segments[1:], strict=False) if a.server != b.server)
                            for r in records),
        "tokens_received": sum(len(r.token_ids) for r in records),
        "ttft_s": _dist([t for r in records if r.kind == "stream" and (t := r.ttft) is not None]),
        "unary_latency_s": _dist([r.ended_at - r.started for r in records
                                  if r.kind == "unary" and r.ended_at is not None and r.error is None]),
        "max_gap_s": _dist([r.max_gap for r in records if r.first_at is not None]),
        "duration_s": _dist([r.ended_at - r.started for r in records
                           if r.ended_at is not None and r.error is None]),
    }


def ttft_between(records: list[Record], start: float, end: float) -> dict[str, float | int]:
    """TTFT of requests started in [start, end): p50/p99/max and how many."""
    values = [t for r in records if r.kind == "stream" and start <= r.started < end and (t := r.ttft) is not None]
    return {"n": len(values), **_dist(values)}
