"""The leader's autoscaler: every `interval_s`, for each model whose policy is enabled, measure,
decide (kpa.py) within min/max, budgets and the forecast's floor, and record the decision in etcd
(fenced on the leader's term) so placement - on every replica's plan - follows it.

The reconciler calls `step()` on each of its rounds and plans with `replicas()`. A new leader
continues from the stored records: the desired count, cooldowns, panic, the last traffic, the
measured load time, and the rate history (read once when it takes a model over); its windows start
empty, so it scales up at once but down only after a full stable window of its own observations.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping

from meshserve.v1 import autoscale_pb2 as asp
from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace
from services.common.etcd_client import EtcdClient, EtcdError, fenced_write
from services.common.membership import MeshView

from .. import budgets
from ..desired import servers_from_view
from ..election import Election
from . import kpa, metrics
from .effective import effective_replicas, enabled_policies, stored_desired
from .measure import observe, spec_max_running
from .policy import Policy
from .signals import SignalFeed, Snapshot
from .track import ModelTrack

log = logging.getLogger(__name__)


class Autoscaler:
    def __init__(self, client: EtcdClient, view: MeshView, election: Election, replica_id: str,
                 feed: SignalFeed, interval_s: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._client = client
        self._view = view
        self._election = election
        self.replica_id = replica_id
        self.feed = feed
        self.interval_s = interval_s
        self._clock = clock
        self.tracks: dict[str, ModelTrack] = {}
        self._last_eval = 0.0
        self._urgent = False
        self.wake: Callable[[], None] = lambda: None
        feed.on_waiting = self.urgent

    def urgent(self) -> None:
        """Requests wait for a first replica somewhere: decide now, not at the next tick."""
        self._urgent = True
        self.wake()

    def replicas(self) -> dict[str, int]:
        """Replica counts for placement: stored decisions, overlaid with this leader's newer ones."""
        out = effective_replicas(self._view)
        for name, track in self.tracks.items():
            if name in out:
                out[name] = track.state.desired_replicas
        return out

    # --- the step -----------------------------------------------------------------------------

    async def step(self) -> None:
        if not self._election.is_leader:
            if self.tracks:
                log.info("no longer leading: autoscaler state stays in etcd for the next leader")
                for name in self.tracks:
                    metrics.forget(name)  # a follower exports no stale decisions
                self.tracks.clear()
            return
        now = self._clock()
        if not self._urgent and now - self._last_eval < self.interval_s * 0.95:
            return
        self._urgent, self._last_eval = False, now
        policies = enabled_policies(self._view)
        await self._adopt(policies, now)
        snap = self.feed.snapshot()
        puts: dict[str, bytes] = {}
        deletes: list[str] = []
        commits: list[tuple[ModelTrack, bytes | None, set[int]]] = []
        for name, track in self.tracks.items():
            self._evaluate(name, track, snap, now)
            state = track.state_to_write()
            if state is not None:
                puts[keyspace.autoscale_state_key(name)] = state
            h_puts, h_deletes, segs = track.history.pending()
            puts.update(h_puts)
            deletes.extend(h_deletes)
            commits.append((track, state, segs))
        deletes.extend(self._orphans(policies))
        if await self._write(puts, deletes):
            for track, state, segs in commits:
                if state is not None:
                    track.persisted = state
                track.history.commit(segs)

    async def _write(self, puts: dict[str, bytes], deletes: list[str]) -> bool:
        if not puts and not deletes:
            return True
        try:
            ok = await fenced_write(self._client, keyspace.ELECTION, self._election.fence, puts,
                                    deletes)
        except EtcdError as exc:
            log.warning("autoscaler: writing decisions failed (etcd): %s; will retry", exc)
            return False
        if not ok:
            log.warning("autoscaler: write refused, this replica's leadership term has ended")
        return ok

    def _orphans(self, policies: Mapping[str, Policy]) -> list[str]:
        """State records of models no longer autoscaled (undeployed or policy disabled)."""
        return [keyspace.AUTOSCALE_STATE + name for name in self._view.autoscale_states
                if name not in policies]

    # --- taking models over -------------------------------------------------------------------

    async def _adopt(self, policies: Mapping[str, Policy], now: float) -> None:
        for name in list(self.tracks):
            if name not in policies:
                del self.tracks[name]
                metrics.forget(name)
        for name, policy in policies.items():
            track = self.tracks.get(name)
            if track is not None:
                if track.policy != policy:
                    track.retune(policy)
                continue
            spec = self._view.models[name]
            stored = self._view.autoscale_states.get(name)
            state = asp.AutoscaleState()
            if stored is not None and stored.model == name:
                state.CopyFrom(stored)
            state.model = name
            state.desired_replicas = stored_desired(policy, stored, spec.replicas)
            track = ModelTrack(policy=policy, state=state, started=now)
            if stored is None:
                track.persisted = b""  # write the starting point at once
            await self._load_history(track, now)
            self.tracks[name] = track
            log.info("autoscaling %s: %d replica(s) to start from", name, state.desired_replicas)

    async def _load_history(self, track: ModelTrack, now: float) -> None:
        try:
            items, _ = await self._client.get_prefix(keyspace.history_prefix(track.policy.model))
        except EtcdError as exc:
            log.warning("autoscaler: rate history of %s unreadable (%s); starting without it",
                        track.policy.model, exc)
            return
        records = [r for r in (keyspace.decode(asp.RateHistory, v) for _, v in sorted(items.items()))
                   if r is not None]
        track.history.load(records, now)

    # --- one model ----------------------------------------------------------------------------

    def _evaluate(self, name: str, track: ModelTrack, snap: Snapshot, now: float) -> None:
        spec = self._view.models[name]
        track.observe(now, observe(self._view, name, snap))
        self._ready_times(name, track, now)
        target = track.last_target = track.target(spec_max_running(spec))
        forecast = track.predict(now, target, self.interval_s)
        cap, binding = self._cap(name, spec)
        limits = kpa.Limits(cap=cap, cap_reason=(f"{binding.describe()} leaves {int(cap)}"
                                                 if binding else ""),
                            floor=min(forecast.floor, track.policy.max_replicas),
                            floor_reason=f"forecast floor {forecast.floor}: {forecast.note}")
        before = track.state.desired_replicas
        decision = kpa.decide(track.policy, track.signals(now, target), track.memory(), limits, now)
        change = track.apply(decision, now, self.replica_id)
        if change is not None:
            direction = "up" if change.to_replicas > before else "down"
            metrics.DECISIONS.labels(name, direction, decision.code).inc()
            log.info("autoscale %s: %d -> %d replicas (%s: %s)%s", name, before, decision.desired,
                     decision.code, decision.reason,
                     f"; limited by {decision.limit}" if decision.limit else "")
        self._export(name, track, decision, forecast.rate, forecast.floor, now)

    def _cap(self, name: str, spec: cp.ModelSpec) -> tuple[float, budgets.Budget | None]:
        budget_list = budgets.from_record(self._view.scaling_budgets)
        if not budget_list:
            return math.inf, None
        servers = servers_from_view(self._view)
        use = budgets.BudgetUse(budget_list, {s.server_id: s for s in servers})
        for (sid, model), placement in self._view.placements.items():
            if model != name:
                use.add(sid, max(0, placement.spec.memory_bytes))
        allowed = {r.region for r in spec.regions} or None
        return budgets.model_cap(use, servers, allowed, max(0, spec.memory_bytes))

    def _ready_times(self, name: str, track: ModelTrack, now: float) -> None:
        """Time from placement to READY, for placements this leader saw before they were ready."""
        placed = set()
        for (sid, model), placement in self._view.placements.items():
            if model != name:
                continue
            key = (sid, placement.since_ms)
            placed.add(key)
            status = self._view.statuses.get((sid, model))
            if status is None or status.state != cp.MODEL_STATE_READY:
                track.pending_ready.add(key)
            elif key in track.pending_ready:
                track.pending_ready.discard(key)
                track.note_ready_time(max(0.0, now - placement.since_ms / 1000))
        track.pending_ready &= placed

    def _export(self, name: str, track: ModelTrack, d: kpa.Decision, rate: float, floor: int,
                now: float) -> None:
        p = track.policy
        metrics.DESIRED.labels(name).set(track.state.desired_replicas)
        metrics.ACTUAL.labels(name).set(track.last_obs.ready)
        metrics.DEMAND.labels(name, "stable").set(track.demand.average(now))
        metrics.DEMAND.labels(name, "panic").set(track.demand.average(now, p.panic_window_s))
        metrics.PANIC.labels(name).set(1 if d.panic_until > now else 0)
        metrics.FORECAST.labels(name).set(rate)
        metrics.FORECAST_FLOOR.labels(name).set(floor)
        metrics.READY_TIME.labels(name).set(track.state.ready_time_s)
        for code in metrics.LIMIT_CODES:
            metrics.LIMITED.labels(name, code).set(1 if d.limit_code == code else 0)
