"""The figures a canary is judged by: requests, errors and time to first token per side.

TTFT is counted in fixed log-spaced buckets (5 ms growing by 15% to ~2 min, then one overflow
bucket), so routers can send counts and the leader can add them up and read a p95 within one
bucket's width (15%), well inside any sensible margin.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from meshserve.v1 import traffic_pb2 as tp

FIRST_BOUND_S = 0.005
GROWTH = 1.15
BOUNDS: tuple[float, ...] = tuple(FIRST_BOUND_S * GROWTH ** k for k in range(73))
N_BUCKETS = len(BOUNDS) + 1  # the last counts everything above BOUNDS[-1]


def bucket(seconds: float) -> int:
    return bisect.bisect_left(BOUNDS, seconds)


def quantile(counts: Sequence[int], q: float) -> float:
    """The q-quantile of bucketed samples (interpolated within its bucket; 0.0 without samples)."""
    total = sum(counts)
    if total <= 0:
        return 0.0
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            low = BOUNDS[i - 1] if 0 < i <= len(BOUNDS) else (0.0 if i == 0 else BOUNDS[-1])
            high = BOUNDS[i] if i < len(BOUNDS) else BOUNDS[-1] * GROWTH
            return low + (high - low) * (rank - seen) / n
        seen += n
    return BOUNDS[-1] * GROWTH


def add(windows: Iterable[tp.TargetWindow]) -> tp.TargetWindow:
    """The sum of several routers' windows, with its p95."""
    out = tp.TargetWindow()
    buckets = [0] * N_BUCKETS
    for w in windows:
        out.requests += w.requests
        out.errors += w.errors
        for i, n in enumerate(w.ttft_buckets[:N_BUCKETS]):
            buckets[i] += n
    out.ttft_buckets.extend(buckets)
    out.ttft_p95_s = quantile(buckets, 0.95)
    return out


def error_rate(w: tp.TargetWindow) -> float:
    return w.errors / w.requests if w.requests else 0.0


def ttft_samples(w: tp.TargetWindow) -> int:
    return sum(w.ttft_buckets)
