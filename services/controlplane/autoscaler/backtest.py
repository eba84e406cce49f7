"""Backtest of the predictive floor on a recorded request-rate trace (`meshctl autoscale backtest`).

Walks the trace bucket by bucket, as the leader would: after two seasons the forecaster is fitted
and then updated with each bucket; for every later bucket it compares the forecast made a lead
time earlier with what came, and what a reactive-only scaler (it sees a bucket's rate only once
the bucket happened, and a replica it adds is ready a lead time later) would have run against the
same plus the forecast's floor. Replicas are rate / per-replica rate, within min and max.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .forecast import HoltWinters


@dataclass
class Step:
    bucket: int
    actual: float
    forecast: float
    needed: int
    reactive: int
    predictive: int


@dataclass
class Result:
    buckets: int = 0
    mape: float = 0.0  # mean absolute percentage error of the forecast (buckets with rate > 0)
    wape: float = 0.0  # absolute errors / actual requests, all buckets: quiet nights weigh little
    rmse: float = 0.0
    reactive_replica_s: float = 0.0
    predictive_replica_s: float = 0.0
    reactive_short: int = 0  # buckets with fewer replicas than needed
    predictive_short: int = 0
    steps: list[Step] = field(default_factory=list)


def read_trace(path: Path) -> list[float]:
    """A CSV of `rate` or `time,rate` rows (a header row is skipped), or JSON {"rates": [...]}."""
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        rates = data["rates"] if isinstance(data, dict) else data
        return [float(r) for r in rates]
    out = []
    for row in csv.reader(text.splitlines()):
        if not row or row[0].startswith("#"):
            continue
        try:
            out.append(float(row[-1]))
        except ValueError:
            continue  # a header
    return out


def _replicas(rate: float, per_replica: float, low: int, high: int) -> int:
    return max(low, min(high, math.ceil(rate / per_replica - 1e-9)))


def backtest(rates: Sequence[float], season: int, lead_buckets: int, per_replica_rps: float,
             min_replicas: int = 1, max_replicas: int = 1000, bucket_s: float = 60.0) -> Result:
    if season < 2 or len(rates) <= 2 * season:
        raise ValueError(f"the trace needs more than two seasons ({2 * season} buckets), it has "
                         f"{len(rates)}")
    if per_replica_rps <= 0 or lead_buckets < 0:
        raise ValueError("per_replica_rps must be > 0 and the lead time >= 0")
    model = HoltWinters.fit(rates[:2 * season], season)
    assert model is not None
    pending: dict[int, float] = {}  # bucket -> forecast made lead_buckets before it
    result = Result()
    errors, squares = [], []
    for i in range(2 * season, len(rates)):
        for h in range(1, lead_buckets + 2):
            pending.setdefault(i + h - 1, model.forecast(h))
        forecast, actual = pending.pop(i), rates[i]
        seen = rates[max(0, i - lead_buckets - 1)]  # what a reactive scaler could have acted on
        needed = _replicas(actual, per_replica_rps, min_replicas, max_replicas)
        reactive = _replicas(seen, per_replica_rps, min_replicas, max_replicas)
        predictive = max(reactive, _replicas(forecast, per_replica_rps, min_replicas, max_replicas))
        result.steps.append(Step(i, actual, forecast, needed, reactive, predictive))
        if actual > 0:
            errors.append(abs(forecast - actual) / actual)
        squares.append((forecast - actual) ** 2)
        model.update(actual)
    result.buckets = len(result.steps)
    result.mape = sum(errors) / len(errors) if errors else 0.0
    total = sum(s.actual for s in result.steps)
    result.wape = sum(abs(s.forecast - s.actual) for s in result.steps) / total if total else 0.0
    result.rmse = math.sqrt(sum(squares) / len(squares))
    result.reactive_replica_s = sum(s.reactive for s in result.steps) * bucket_s
    result.predictive_replica_s = sum(s.predictive for s in result.steps) * bucket_s
    result.reactive_short = sum(1 for s in result.steps if s.reactive < s.needed)
    result.predictive_short = sum(1 for s in result.steps if s.predictive < s.needed)
    return result
