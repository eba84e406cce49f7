"""The leader's canary loop: every couple of seconds, for each canary policy, add up the routers'
windows for its current generation and step, judge them (canary_judge.py) and write the state
routers apply. Writes are fenced on the leader's term, made only if the state is unchanged since
it was read (an operator's promote or rollback in between wins) and only while the policy
exists. A state whose figures alone changed is written at most every FIGURES_EVERY_S.
"""

from __future__ import annotations

import asyncio
import logging

from meshserve.v1 import traffic_pb2 as tp

from services.common import keyspace
from services.common.errors import InvalidArgument
from services.common.etcd_client import EtcdClient, EtcdError
from services.common.etcd_txn import present, put_op, txn, unchanged
from services.common.lifecycle import now_ms
from services.common.membership import MeshView
from services.common.tasks import stop_task
from services.common.traffic import records, window

from .canary_judge import judge, moved
from .election import Election

log = logging.getLogger(__name__)

INTERVAL_S = 2.0
FIGURES_EVERY_S = 5.0
READ_TIMEOUT_S = 2.0
#: A router's window older than this is not counted (the router is gone or stuck).
STALE_STATS_MS = 15_000


class CanaryController:
    def __init__(self, etcd: EtcdClient, view: MeshView, election: Election, replica_id: str,
                 interval_s: float = INTERVAL_S) -> None:
        self._etcd = etcd
        self._view = view
        self._election = election
        self._replica_id = replica_id
        self._interval_s = interval_s

    async def run(self) -> None:
        while True:
            if self._election.is_leader:
                try:
                    await self.step()
                except asyncio.CancelledError:
                    raise
                except EtcdError as exc:
                    log.warning("canary step failed (etcd): %s", exc)
                except Exception:  # the loop must outlive a bad round
                    log.exception("canary step failed")
            await asyncio.sleep(self._interval_s)

    async def step(self) -> None:
        for name, msg in list(self._view.traffic_policies.items()):
            if msg.WhichOneof("kind") != "canary":
                continue
            try:
                spec = records.parse(msg).spec
            except InvalidArgument:
                continue  # reported by ListTrafficPolicies; routers ignore it
            assert isinstance(spec, records.Canary)
            await self._judge_one(name, msg, spec)

    async def _windows(self, name: str, generation: int, step: int) -> tuple[tp.TargetWindow, tp.TargetWindow]:
        items, _ = await self._etcd.get_prefix(keyspace.traffic_stats_prefix(name))
        fresh = now_ms() - STALE_STATS_MS
        stats = [s for s in (keyspace.decode(tp.TrafficStats, v) for v in items.values())
                 if s is not None and s.generation == generation and s.step == step and s.at_ms >= fresh]
        return window.add(s.stable for s in stats), window.add(s.canary for s in stats)

    async def _judge_one(self, name: str, msg: tp.TrafficPolicy, spec: records.Canary) -> None:
        key = keyspace.canary_state_key(name)
        value, mod = await self._etcd.read(key, READ_TIMEOUT_S)
        state = keyspace.decode(tp.CanaryState, value) if value else None
        now = now_ms()
        fresh = state is None or state.generation != msg.generation
        if state is None or fresh:
            state = tp.CanaryState(name=name, generation=msg.generation, phase=tp.CANARY_PHASE_PROGRESSING,
                                   step_since_ms=now, reason=f"started at step 1 ({spec.steps[0]}%)")
        elif state.phase != tp.CANARY_PHASE_PROGRESSING:
            return
        stable, canary = await self._windows(name, state.generation, min(state.step, len(spec.steps) - 1))
        new = judge(spec, state, stable, canary, now)
        new.decided_by = self._replica_id
        due = now - state.updated_ms >= FIGURES_EVERY_S * 1000
        if fresh or moved(state, new) or (due and new.reason != state.reason):
            if moved(state, new):
                log.info("canary %s: %s", name, new.reason)
            await self._write(key, new, mod, keyspace.traffic_policy_key(name))

    async def _write(self, key: str, state: tp.CanaryState, mod: int, policy_key: str) -> bool:
        raw = self._etcd.raw
        fence = raw.transactions.value(keyspace.ELECTION.encode()) == self._election.fence
        result = await txn(self._etcd, [fence, unchanged(self._etcd, key, mod), present(self._etcd, policy_key)],
                           [put_op(key, keyspace.encode(state))])
        return result.succeeded


async def stop(task: asyncio.Task) -> None:
    await stop_task(task)
