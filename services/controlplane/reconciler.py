"""The leader's loop: check health, release finished drains, record load failures (halting a model
that failed on too many servers), let the autoscaler decide replica counts, and make placements
follow the plan.

Only the leader acts, and every write is fenced on its election term, so a deposed leader's late
writes are refused by etcd. Followers run nothing here; they take over from etcd's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace
from services.common.etcd_client import EtcdClient, EtcdError, fenced_write
from services.common.lifecycle import now_ms
from services.common.membership import MeshView

from . import halts, metrics
from .autoscaler.autoscaler import Autoscaler
from .autoscaler.effective import effective_replicas
from .desired import plan_for, split_models
from .election import Election
from .health import HealthChecker
from .probes import ServerProbe

log = logging.getLogger(__name__)


def _same_spec(a: cp.ModelSpec, b: cp.ModelSpec) -> bool:
    """Whether a placed copy still describes what to load (replica counts do not matter; a new
    load generation does: servers load it again)."""
    return (a.backend, a.source, a.memory_bytes, dict(a.options), a.generation) == \
        (b.backend, b.source, b.memory_bytes, dict(b.options), b.generation)


class Reconciler:
    def __init__(self, client: EtcdClient, view: MeshView, election: Election,
                 checker: HealthChecker, probe: ServerProbe, interval_s: float = 1.0,
                 halt_after: int = halts.DEFAULT_HALT_AFTER,
                 autoscaler: Autoscaler | None = None) -> None:
        self._client = client
        self._view = view
        self._election = election
        self._checker = checker
        self._probe = probe
        self._interval_s = interval_s
        self._halt_after = halt_after
        self._autoscaler = autoscaler
        self._wake = asyncio.Event()
        view.subscribe(self._wake.set)
        self._last_health = 0.0

    async def run(self) -> None:
        while True:
            if self._election.is_leader:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except EtcdError as exc:
                    log.warning("reconcile step failed (etcd): %s", exc)
                except Exception:
                    log.exception("reconcile step failed")
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval_s)

    def wake(self) -> None:
        """Run a round now (the autoscaler has something urgent: requests wait for a replica)."""
        self._wake.set()

    async def _write(self, puts: dict[str, bytes], deletes: list[str],
                     existing: tuple[str, ...] = ()) -> bool:
        if not puts and not deletes:
            return True
        ok = await fenced_write(self._client, keyspace.ELECTION, self._election.fence, puts, deletes,
                                existing)
        if not ok and not existing:
            log.warning("write refused: this replica's leadership term has ended")
        return ok

    async def step(self) -> None:
        now = time.monotonic()
        if now - self._last_health >= self._checker.settings.interval_s:
            self._last_health = now
            puts, deletes = await self._checker.check_round()
            await self._write(puts, deletes)
        await self._release_drains()
        records = await self._track_failures()
        await self._autoscale()
        await self._place(records)
        self._export_gauges()

    async def _autoscale(self) -> None:
        """Decide replica counts; trouble in the autoscaler never stops placement."""
        if self._autoscaler is None:
            return
        try:
            await self._autoscaler.step()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("autoscaler step failed; placing with the last decisions")

    async def _release_drains(self) -> None:
        for sid, record in list(self._view.drains.items()):
            if record.released:
                continue
            info = self._view.servers.get(sid)
            why = ""
            if info is None:
                why = "server left"
            elif now_ms() >= record.release_deadline_ms:
                why = "wait for in-flight requests ran out"
            else:
                load = await self._probe.load(sid, info.address, timeout=1.0)
                if load is not None and load.running == 0 and load.queue_depth == 0:
                    why = "no request in flight"
            if why:
                log.info("drain of %s released (%s); its models move elsewhere", sid, why)
                released = cp.DrainRecord()
                released.CopyFrom(record)
                released.released = True
                key = keyspace.DRAIN + sid
                # Only while the drain still exists: an undrain meanwhile must not be undone.
                await self._write({key: keyspace.encode(released)}, [], existing=(key,))

    async def _track_failures(self) -> halts.Records:
        """Record new load failures; the records come back so this step's plan already honours
        a halt they start (this replica's watch may not have its own write yet)."""
        models, _ = split_models(self._view)
        records = halts.updated(self._view, models, self._halt_after)
        if not await self._write(*halts.changes(self._view, records)):
            return self._view.load_failures
        return records

    async def _place(self, records: halts.Records) -> None:
        plan = plan_for(self._view, records,
                        self._autoscaler.replicas() if self._autoscaler is not None else None)
        desired = plan.pairs()
        current = set(self._view.placements)
        puts, deletes = {}, []
        for sid, model in desired:
            spec = self._view.models[model]
            placed = self._view.placements.get((sid, model))
            if placed is None or not _same_spec(placed.spec, spec):
                puts[keyspace.placement_key(sid, model)] = keyspace.encode(
                    cp.Placement(server_id=sid, spec=spec, since_ms=now_ms()))
        for sid, model in current - desired:
            deletes.append(keyspace.pair_key(keyspace.PLACEMENT, sid, model))
            reason = self._removal_reason(sid, model)
            if reason != "scaled":
                metrics.FAILOVERS.labels(reason).inc()
            log.info("placement %s/%s removed (%s)", sid, model, reason)
        for model, why in plan.unsatisfied.items():
            log.debug("model %s: %s", model, why)
        if puts or deletes:
            log.info("placements: +%d -%d", len(puts), len(deletes))
        await self._write(puts, deletes)

    def _removal_reason(self, sid: str, model: str) -> str:
        if sid not in self._view.servers:
            return "server_gone"
        if self._view.verdict(sid) == cp.SERVING_STATE_NOT_SERVING:
            return "unhealthy"
        if sid in self._view.drains:
            return "drained"
        status = self._view.statuses.get((sid, model))
        if status is not None and status.state == cp.MODEL_STATE_FAILED:
            return "load_failed"
        return "scaled"

    def _export_gauges(self) -> None:
        states = {"SERVING": 0, "NOT_SERVING": 0, "DRAINING": 0}
        for sid in self._view.servers:
            if sid in self._view.drains:
                states["DRAINING"] += 1
            elif self._view.verdict(sid) == cp.SERVING_STATE_NOT_SERVING:
                states["NOT_SERVING"] += 1
            else:
                states["SERVING"] += 1
        for state, n in states.items():
            metrics.SERVERS.labels(state).set(n)
        autoscaled = effective_replicas(self._view)
        for name, spec in self._view.models.items():
            metrics.PLACEMENTS_DESIRED.labels(name).set(autoscaled.get(name, spec.replicas))
            metrics.PLACEMENTS_READY.labels(name).set(len(
                [1 for (s, m), st in self._view.statuses.items()
                 if m == name and st.state == cp.MODEL_STATE_READY]))
