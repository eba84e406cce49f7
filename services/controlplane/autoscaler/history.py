"""A model's request-rate history, bucketed, and its compact form in etcd.

The leader counts arrivals into buckets of `bucket_s`; a closed bucket's rate is appended (NaN
where too little of it was observed, e.g. while no replica led). In etcd the series is cut into
segments of SEGMENT buckets under /meshserve/autoscale/history/<model>/<n>: closed segments are
written once and only the open one is rewritten (a few hundred bytes per bucket), and segments
older than the retention (three seasons) are deleted, so the history costs little space and
little write traffic however long it runs.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from meshserve.v1 import autoscale_pb2 as asp

from services.common import keyspace

SEGMENT = 64
#: A bucket needs this share of its time observed to count as measured.
MIN_COVERAGE = 0.5
NAN = float("nan")


class RateHistory:
    def __init__(self, model: str, bucket_s: float, keep: int) -> None:
        self.model = model
        self.bucket_s = bucket_s
        self.keep = max(keep, SEGMENT)
        self.first = 0  # bucket index of rates[0]
        self.rates: list[float] = []
        self._open: int | None = None  # the bucket being counted
        self._count = 0.0
        self._covered = 0.0
        self.dirty: set[int] = set()  # segments to write
        self.stored: set[int] = set()  # segments known to be in etcd
        self.resets = 0  # times the series started over (a gap longer than the retention)

    def bucket_of(self, t: float) -> int:
        return int(t // self.bucket_s)

    # --- etcd ---------------------------------------------------------------------------------

    def load(self, records: Iterable[asp.RateHistory], now: float) -> None:
        """Segments read back; ones of another model or bucket size are dropped (and deleted)."""
        values: dict[int, float] = {}
        for r in records:
            seg = r.first_bucket // SEGMENT
            self.stored.add(seg)
            if r.model != self.model or r.bucket_s != self.bucket_s or r.first_bucket % SEGMENT:
                continue
            for i, v in enumerate(r.rates[:SEGMENT]):
                values[r.first_bucket + i] = float(v)
        last = self.bucket_of(now) - 1
        known = [b for b, v in values.items() if last - self.keep < b <= last and math.isfinite(v)]
        if known:
            self.first = min(known)
            self.rates = [values.get(b, NAN) for b in range(self.first, max(known) + 1)]

    def segment(self, seg: int) -> asp.RateHistory:
        start = seg * SEGMENT
        rates = [self.rates[b - self.first] if 0 <= b - self.first < len(self.rates) else NAN
                 for b in range(start, min(start + SEGMENT, self.first + len(self.rates)))]
        return asp.RateHistory(model=self.model, bucket_s=self.bucket_s, first_bucket=start,
                               rates=rates)

    def pending(self) -> tuple[dict[str, bytes], list[str], set[int]]:
        """Puts for segments changed since the last commit, deletes for segments out of
        retention, and the segments the puts cover (hand them to `commit` once written)."""
        live = self._segments()
        segs = self.dirty & live
        puts = {keyspace.history_key(self.model, seg): keyspace.encode(self.segment(seg))
                for seg in sorted(segs)}
        deletes = [keyspace.history_key(self.model, seg) for seg in sorted(self.stored - live)]
        return puts, deletes, segs

    def commit(self, segs: set[int]) -> None:
        live = self._segments()
        self.stored = (self.stored & live) | segs
        self.dirty -= segs

    def _segments(self) -> set[int]:
        if not self.rates:
            return set()
        return set(range(self.first // SEGMENT, (self.first + len(self.rates) - 1) // SEGMENT + 1))

    # --- counting -----------------------------------------------------------------------------

    def observe(self, now: float, arrivals: float, dt: float) -> list[float]:
        """Count `arrivals` seen over the last `dt` seconds; returns the rates of buckets closed
        by this call (gaps as NaN), in order, for the forecaster."""
        bucket = self.bucket_of(now)
        closed: list[float] = []
        if self._open is not None and bucket != self._open:
            rate = self._count / self._covered if self._covered >= MIN_COVERAGE * self.bucket_s \
                else NAN
            closed = self._append(self._open, rate)
            self._count = self._covered = 0.0
        if self._open != bucket:
            self._open = bucket
        self._count += arrivals
        self._covered += min(dt, self.bucket_s)
        return closed

    def _append(self, bucket: int, rate: float) -> list[float]:
        end = self.first + len(self.rates)
        if not self.rates or bucket - end >= self.keep or bucket < end:
            if self.rates and bucket < end:
                return []  # the clock went back: never rewrite the past
            self.first, self.rates = bucket, []
            self.resets += 1
            added = [rate]
        else:
            added = [NAN] * (bucket - end) + [rate]
        start = self.first + len(self.rates)
        self.rates.extend(added)
        self.dirty.update(range(start // SEGMENT, bucket // SEGMENT + 1))
        if len(self.rates) > self.keep:
            drop = len(self.rates) - self.keep
            self.rates = self.rates[drop:]
            self.first += drop
        return added

    def measured(self) -> int:
        return sum(1 for v in self.rates if math.isfinite(v))
