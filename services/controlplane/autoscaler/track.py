"""What the leader keeps in memory for one autoscaled model: the windows, the rate history and
its forecaster, the decision record (mirrored to etcd), recent decisions and the last evaluation
(for `meshctl autoscale explain`). A new leader rebuilds it from the stored record and history."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from meshserve.v1 import autoscale_pb2 as asp

from services.common import keyspace

from . import kpa
from .forecast import HoltWinters
from .history import RateHistory
from .measure import Observation
from .policy import Policy
from .windows import Window

#: Lead time before any load was measured (a replica's time to READY).
DEFAULT_LEAD_S = 30.0
#: The last-traffic stamp in etcd may lag by this much (it only guards the scale-to-zero grace).
TRAFFIC_STAMP_S = 15.0
READY_EWMA = 0.3
RECENT = 20
#: Requests in the stable window before the rate-to-concurrency ratio counts.
MIN_REQUESTS_FOR_RATIO = 10


@dataclass
class Forecast:
    rate: float = 0.0
    floor: int = 0
    lead_s: float = DEFAULT_LEAD_S
    note: str = ""


@dataclass
class ModelTrack:
    policy: Policy
    state: asp.AutoscaleState
    started: float  # when this leader began observing (Unix seconds)
    history: RateHistory = field(init=False)
    forecaster: HoltWinters | None = None
    persisted: bytes = b""
    recent: deque[asp.AutoscaleDecision] = field(default_factory=lambda: deque(maxlen=RECENT))
    pending_ready: set[tuple[str, int]] = field(default_factory=set)
    last_tick: float = 0.0
    fitted_at: int = -1  # buckets appended when the forecaster was last fitted
    appended: int = 0  # buckets appended to the history by this leader
    resets_seen: int = 0
    last_obs: Observation = field(default_factory=Observation)
    last: kpa.Decision | None = None
    forecast: Forecast = field(default_factory=Forecast)
    max_running: float = 0.0  # the last reported per-replica capacity
    last_target: float = 0.0  # requests in flight per replica aimed for at the last tick

    def __post_init__(self) -> None:
        p = self.policy
        self.history = RateHistory(p.model, p.bucket_s, keep=3 * p.season_buckets)
        self.demand = Window(p.stable_window_s)
        self.served = Window(p.stable_window_s)
        self.queued = Window(p.panic_window_s)
        self.kv = Window(p.stable_window_s)
        self.rate = Window(p.stable_window_s)
        self.persisted = keyspace.encode(self.state)

    def retune(self, policy: Policy) -> None:
        """A changed policy: windows follow; a new bucket or season restarts the history."""
        old, self.policy = self.policy, policy
        for w in (self.demand, self.served, self.kv, self.rate):
            w.resize(policy.stable_window_s)
        self.queued.resize(policy.panic_window_s)
        if (old.bucket_s, old.season_s) != (policy.bucket_s, policy.season_s):
            stored = self.history.stored | self.history.dirty
            self.history = RateHistory(policy.model, policy.bucket_s, keep=3 * policy.season_buckets)
            self.history.stored = stored
            self.forecaster, self.fitted_at, self.resets_seen = None, -1, 0

    # --- observing ----------------------------------------------------------------------------

    def observe(self, now: float, obs: Observation) -> None:
        dt = now - self.last_tick if self.last_tick else 1.0
        self.last_tick, self.last_obs = now, obs
        self.demand.add(now, obs.demand)
        self.served.add(now, max(0.0, obs.demand - obs.queued))
        self.queued.add(now, obs.queued)
        self.kv.add(now, obs.kv_utilization)
        self.rate.add(now, obs.arrivals / max(dt, 1e-3))
        if obs.max_running:
            self.max_running = obs.max_running
        if obs.traffic:
            self.state.last_traffic_ms = int(now * 1000)
        self._ratio(now)
        for rate in self.history.observe(now, obs.arrivals, dt):
            self.appended += 1
            if self.forecaster is not None:
                self.forecaster.update(rate)
        self._refit()

    def _ratio(self, now: float) -> None:
        """Little's law: requests served at once per request per second (no queueing)."""
        rate = self.rate.average(now)
        if rate * self.policy.stable_window_s >= MIN_REQUESTS_FOR_RATIO:
            self.state.inflight_per_rps = self.served.average(now) / rate

    def _refit(self) -> None:
        """Fit when enough history is there, and again after every season of new buckets."""
        season = self.policy.season_buckets
        if self.history.resets != self.resets_seen:
            self.resets_seen, self.forecaster, self.fitted_at = self.history.resets, None, -1
        if len(self.history.rates) < 2 * season:
            return
        if self.forecaster is not None and self.appended - self.fitted_at < season:
            return
        self.forecaster = HoltWinters.fit(self.history.rates, season)
        self.fitted_at = self.appended

    def note_ready_time(self, seconds: float) -> None:
        s = self.state
        s.ready_time_s = seconds if not s.ready_time_samples else (
            READY_EWMA * seconds + (1 - READY_EWMA) * s.ready_time_s)
        s.ready_time_samples += 1

    # --- deciding -----------------------------------------------------------------------------

    def target(self, fallback_max_running: float) -> float:
        p = self.policy
        if p.target_concurrency:
            return p.target_concurrency
        capacity = self.max_running or fallback_max_running or 1.0
        return max(capacity * p.target_utilization, 1e-3)

    def signals(self, now: float, target: float) -> kpa.Signals:
        p, obs = self.policy, self.last_obs
        last = self.state.last_traffic_ms / 1000 if self.state.last_traffic_ms else self.started
        return kpa.Signals(
            ready=obs.ready, stable_demand=self.demand.average(now),
            panic_demand=self.demand.average(now, p.panic_window_s),
            queued=self.queued.average(now), kv_utilization=self.kv.average(now),
            waiting_for_replica=obs.waiting_for_replica, traffic=obs.traffic,
            idle_s=max(0.0, now - last), observed_s=now - self.started,
            ttft_p95_ms=obs.ttft_p95_ms, target=target)

    def memory(self) -> kpa.Memory:
        s = self.state
        return kpa.Memory(desired=s.desired_replicas, last_scale_up=s.last_scale_up_ms / 1000,
                          last_scale_down=s.last_scale_down_ms / 1000,
                          panic_until=s.panic_until_ms / 1000,
                          ready_time_s=s.ready_time_s if s.ready_time_samples else DEFAULT_LEAD_S)

    def predict(self, now: float, target: float, interval_s: float) -> Forecast:
        """The forecast's floor: the highest rate expected before a replica placed now could be
        READY, turned into replicas by the measured in-flight-per-rate ratio."""
        s, p = self.state, self.policy
        lead = s.ready_time_s if s.ready_time_samples else DEFAULT_LEAD_S
        out = Forecast(lead_s=lead)
        if not p.predictive:
            out.note = "predictive scaling is off"
        elif self.forecaster is None:
            out.note = (f"needs two seasons of rate history ({len(self.history.rates)}/"
                        f"{2 * p.season_buckets} buckets)")
        elif not s.inflight_per_rps:
            out.note = "no in-flight-per-rate ratio measured yet"
        else:
            last = self.history.first + len(self.history.rates) - 1
            first = self.history.bucket_of(now) - last
            end = self.history.bucket_of(now + lead + interval_s) - last
            out.rate = max(self.forecaster.forecast(h) for h in range(max(1, first), max(1, end) + 1))
            out.floor = math.ceil(out.rate * s.inflight_per_rps / target - kpa.EPS)
            out.note = (f"{out.rate:.2f} req/s expected within {lead:.0f}s x "
                        f"{s.inflight_per_rps:.2f}s in flight per request")
        self.forecast = out
        return out

    def apply(self, decision: kpa.Decision, now: float, leader: str) -> asp.AutoscaleDecision | None:
        """Record the decision; returns the change, if it was one."""
        s = self.state
        self.last = decision
        s.panic_until_ms = int(decision.panic_until * 1000)
        s.decided_by = leader
        if not decision.changed(s.desired_replicas):
            return None
        change = asp.AutoscaleDecision(at_ms=int(now * 1000), from_replicas=s.desired_replicas,
                                       to_replicas=decision.desired, reason=decision.reason,
                                       limit=decision.limit)
        if decision.desired > s.desired_replicas:
            s.last_scale_up_ms = change.at_ms
        else:
            s.last_scale_down_ms = change.at_ms
        s.desired_replicas, s.reason, s.limit, s.decided_ms = (
            decision.desired, decision.reason, decision.limit, change.at_ms)
        self.recent.append(change)
        return change

    def state_to_write(self) -> bytes | None:
        """The record's bytes when etcd should get them: a decision, panic or load-time change,
        or a last-traffic stamp older than TRAFFIC_STAMP_S."""
        stored = keyspace.decode(asp.AutoscaleState, self.persisted) or asp.AutoscaleState()
        mine = asp.AutoscaleState()
        mine.CopyFrom(self.state)
        stale = mine.last_traffic_ms - stored.last_traffic_ms > TRAFFIC_STAMP_S * 1000
        mine.last_traffic_ms, mine.inflight_per_rps = stored.last_traffic_ms, stored.inflight_per_rps
        mine.decided_by = stored.decided_by
        if not stale and keyspace.encode(mine) == keyspace.encode(stored):
            return None
        return keyspace.encode(self.state)
