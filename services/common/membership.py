"""A live, read-only view of the mesh, built from etcd watches.

Routers and the control plane read etcd through this view, so every replica sees the same state
for the same etcd revision. When etcd is unreachable the view keeps the last state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from meshserve.v1 import autoscale_pb2, modelserver_pb2
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import traffic_pb2 as tp

from . import keyspace
from .etcd_client import EtcdClient, PrefixMirror

log = logging.getLogger(__name__)

READY = cp.MODEL_STATE_READY
NOT_SERVING = cp.SERVING_STATE_NOT_SERVING


class MeshView:
    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self.servers: dict[str, modelserver_pb2.ServerInfo] = {}
        self.drains: dict[str, cp.DrainRecord] = {}
        self.routers: dict[str, cp.ReplicaInfo] = {}
        self.controlplanes: dict[str, cp.ReplicaInfo] = {}
        self.models: dict[str, cp.ModelSpec] = {}
        self.placements: dict[tuple[str, str], cp.Placement] = {}
        self.statuses: dict[tuple[str, str], cp.ModelStatus] = {}
        self.health: dict[str, cp.HealthVerdict] = {}
        self.load_failures: dict[str, cp.LoadFailures] = {}
        #: Traffic policies (unchecked: readers parse them with services/common/traffic) and the
        #: leader's canary states.
        self.traffic_policies: dict[str, tp.TrafficPolicy] = {}
        self.canary_states: dict[str, tp.CanaryState] = {}
        self.autoscale_policies: dict[str, autoscale_pb2.AutoscalePolicy] = {}
        self.autoscale_states: dict[str, autoscale_pb2.AutoscaleState] = {}
        self._singles: dict[str, object] = {}
        self._listeners: list[Callable[[], None]] = []
        self._waiters: set[asyncio.Event] = set()
        self._mirrors = [
            self._mirror(keyspace.SERVERS, self.servers),
            self._mirror(keyspace.DRAIN, self.drains),
            self._mirror(keyspace.ROUTERS, self.routers),
            self._mirror(keyspace.CONTROLPLANES, self.controlplanes),
            self._mirror(keyspace.MODELS, self.models),
            self._mirror(keyspace.PLACEMENT, self.placements, pair=True),
            self._mirror(keyspace.STATUS, self.statuses, pair=True),
            self._mirror(keyspace.HEALTH, self.health),
            self._mirror(keyspace.ROUTING_POLICY, self._singles),
            self._mirror(keyspace.ELECTION, self._singles),
            self._mirror(keyspace.LOAD_FAILURES, self.load_failures),
            self._mirror(keyspace.TRAFFIC_POLICIES, self.traffic_policies),
            self._mirror(keyspace.CANARY_STATES, self.canary_states),
            self._mirror(keyspace.AUTOSCALE_POLICIES, self.autoscale_policies),
            self._mirror(keyspace.AUTOSCALE_STATE, self.autoscale_states),
            self._mirror(keyspace.SCALING_BUDGETS, self._singles),
        ]

    def _mirror(self, prefix: str, table: dict, pair: bool = False) -> PrefixMirror:
        cls = keyspace.VALUE_TYPES[prefix]

        def on_change(key: str, value: bytes | None) -> None:
            ident = keyspace.split_pair(prefix, key) if pair else (
                keyspace.id_from_key(prefix, key) or prefix)
            if value is None:
                table.pop(ident, None)
            else:
                msg = keyspace.decode(cls, value)
                if msg is None:
                    log.error("skipping corrupt value at %s", key)
                    return
                table[ident] = msg
            for listener in self._listeners:
                listener()
            for waiter in self._waiters:
                waiter.set()
        return PrefixMirror(self._client, prefix, on_change)

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Called (synchronously, on the event loop) after every change."""
        self._listeners.append(listener)

    async def start(self, wait: float = 10.0) -> None:
        await asyncio.gather(*(m.start(wait) for m in self._mirrors))

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self._mirrors))

    async def wait_for_revision(self, key: str, revision: int, timeout: float) -> bool:
        """Read-your-writes: wait until the watch covering `key` has seen etcd revision
        `revision` (that of a write just made). False when it has not within `timeout`."""
        mirror = next((m for m in self._mirrors if key.startswith(m.prefix)), None)
        if mirror is None:
            return True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while mirror.revision < revision:
            left = deadline - loop.time()
            if left <= 0:
                return False
            event = asyncio.Event()
            self._waiters.add(event)
            try:
                # A short poll as well: a resync can advance the revision without a change.
                await asyncio.wait_for(event.wait(), min(left, 0.1))
            except TimeoutError:
                pass
            finally:
                self._waiters.discard(event)
        return True

    @property
    def connected(self) -> bool:
        return all(m.connected for m in self._mirrors)

    @property
    def routing_policy(self) -> cp.RoutingPolicy | None:
        record = self._singles.get(keyspace.ROUTING_POLICY)
        return record if isinstance(record, cp.RoutingPolicy) else None

    @property
    def leader(self) -> cp.LeaderRecord | None:
        record = self._singles.get(keyspace.ELECTION)
        return record if isinstance(record, cp.LeaderRecord) else None

    @property
    def scaling_budgets(self) -> autoscale_pb2.ScalingBudgets | None:
        record = self._singles.get(keyspace.SCALING_BUDGETS)
        return record if isinstance(record, autoscale_pb2.ScalingBudgets) else None

    def is_draining(self, server_id: str) -> bool:
        return server_id in self.drains

    def verdict(self, server_id: str) -> int:
        """SERVING unless the health checker said otherwise (a live lease is the default)."""
        v = self.health.get(server_id)
        return v.state if v is not None else cp.SERVING_STATE_SERVING

    def serving(self, server_id: str) -> bool:
        return (server_id in self.servers and not self.is_draining(server_id)
                and self.verdict(server_id) != NOT_SERVING)

    def ready_models(self, server_id: str) -> list[str]:
        return sorted(m for (s, m), st in self.statuses.items() if s == server_id and st.state == READY)

    def servers_for(self, model: str) -> list[modelserver_pb2.ServerInfo]:
        """Routing candidates: the model READY there, verdict SERVING, not draining."""
        return [self.servers[s] for (s, m), st in self.statuses.items()
                if m == model and st.state == READY and self.serving(s)]

    def ready_by_model(self) -> dict[str, list[modelserver_pb2.ServerInfo]]:
        out: dict[str, list[modelserver_pb2.ServerInfo]] = {}
        for (s, m), st in self.statuses.items():
            if st.state == READY and self.serving(s):
                out.setdefault(m, []).append(self.servers[s])
        return out

    def known_models(self) -> set[str]:
        """Models some live server reports on or that are deployed."""
        return {m for (s, m) in self.statuses if s in self.servers} | set(self.models)
