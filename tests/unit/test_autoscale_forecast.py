"""The predictive floor's parts: Holt-Winters over a seasonal series, and the bucketed rate
history with its compact segments in etcd (encoded, read back, trimmed)."""

from __future__ import annotations

import math
import random

from meshserve.v1 import autoscale_pb2 as asp

from services.common import keyspace
from services.controlplane.autoscaler.forecast import HoltWinters
from services.controlplane.autoscaler.history import SEGMENT, RateHistory

SEASON = 24


def diurnal(n: int, noise: float = 0.0, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [max(0.0, 10 + 8 * math.sin(2 * math.pi * i / SEASON) + 0.05 * i + rng.gauss(0, noise))
            for i in range(n)]


def test_holt_winters_predicts_the_next_season_of_a_seasonal_series():
    series = diurnal(4 * SEASON, noise=0.3)
    model = HoltWinters.fit(series[:3 * SEASON], SEASON)
    assert model is not None
    truth = series[3 * SEASON:]
    errors = [abs(model.forecast(h) - truth[h - 1]) / truth[h - 1] for h in range(1, SEASON + 1)]
    assert sum(errors) / len(errors) < 0.1
    # A flat (non-seasonal) guess would miss by far more: the season is what it learned.
    flat = sum(series[2 * SEASON:3 * SEASON]) / SEASON
    assert sum(abs(flat - t) / t for t in truth) / SEASON > 0.3


def test_gaps_are_absorbed_and_short_series_give_no_model():
    series = diurnal(3 * SEASON)
    for i in (5, 30, 31, 60):
        series[i] = float("nan")
    model = HoltWinters.fit(series, SEASON)
    assert model is not None and all(math.isfinite(model.forecast(h)) for h in range(1, 30))
    assert HoltWinters.fit(series[:2 * SEASON - 1], SEASON) is None
    assert min(model.forecast(h) for h in range(1, 60)) >= 0.0


def test_history_buckets_rates_and_marks_unobserved_ones_missing():
    h = RateHistory("m", bucket_s=10, keep=1000)
    t = 1000.0  # bucket 100
    closed = []
    for _ in range(20):  # 20 s at 5 requests per second: buckets 100 and 101
        closed += h.observe(t, 5, 1.0)
        t += 1.0
    closed += h.observe(t + 30, 0, 1.0)  # buckets 102-104 never observed, 105 opens
    assert closed == [5.0, 5.0] and h.first == 100
    later = h.observe(t + 40, 0, 1.0)  # 105 closes with a tenth of it observed
    assert len(later) == 4 and all(math.isnan(v) for v in later)
    assert h.first == 100 and len(h.rates) == 6 and h.measured() == 2


def test_history_segments_round_trip_through_etcd_records_and_trim():
    h = RateHistory("m", bucket_s=1, keep=2 * SEGMENT)
    t = 10_000.0
    for i in range(3 * SEGMENT + 5):
        h.observe(t + i, i % 7, 1.0)
    puts, deletes, segs = h.pending()
    assert len(h.rates) == 2 * SEGMENT and not deletes
    assert all(k.startswith(keyspace.history_prefix("m")) for k in puts)
    h.commit(segs)
    assert h.pending()[0] == {}
    back = RateHistory("m", bucket_s=1, keep=2 * SEGMENT)
    records = [r for r in (keyspace.decode(asp.RateHistory, v) for v in puts.values()) if r]
    back.load(records, t + 3 * SEGMENT + 4)
    assert back.first == h.first and back.rates == h.rates
    # Records of another bucket size are dropped (and, being stored, deleted).
    other = RateHistory("m", bucket_s=2, keep=2 * SEGMENT)
    other.load(records, t + 500)
    assert other.rates == [] and other.pending()[1]


def test_backtest_replays_a_trace_and_the_floor_covers_what_reactive_misses(tmp_path):
    from services.cli.meshctl import main
    from services.controlplane.autoscaler.backtest import backtest, read_trace

    series = diurnal(4 * SEASON, noise=0.2)
    result = backtest(series, SEASON, lead_buckets=2, per_replica_rps=2.0, bucket_s=60)
    assert result.buckets == 2 * SEASON and result.wape < 0.1
    assert result.predictive_short < result.reactive_short
    assert result.predictive_replica_s >= result.reactive_replica_s
    trace = tmp_path / "trace.csv"
    trace.write_text("time,rate\n" + "".join(f"{i * 60},{r}\n" for i, r in enumerate(series)))
    assert read_trace(trace) == series
    assert main(["autoscale", "backtest", str(trace), "--bucket", "60", "--season", str(60 * SEASON),
                 "--lead", "120", "--per-replica-rps", "2"]) == 0
    assert main(["autoscale", "backtest", str(trace), "--season", str(60 * 1000),
                 "--per-replica-rps", "2"]) == 2  # fewer than two seasons: refused
