"""A model server process: serve ModelServerService, follow placements, register on a lease.

Shutdown order matters for "nothing is lost": stop accepting, leave membership (routers stop
picking us), let in-flight requests finish within the grace period, then stop engines.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from grpc_health.v1 import health
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

from services.cache import runtime as cache_runtime
from services.common import keyspace
from services.common.etcd_client import EtcdClient, LeaseKeeper, PrefixMirror
from services.common.grpc_util import set_serving
from services.common.lifecycle import now_ms
from services.common.replica import ReplicaParts, run_replica

from .engine import ModelSpec
from .manager import ModelManager
from .servicer import ModelServerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = modelserver_pb2.DESCRIPTOR.services_by_name["ModelServerService"].full_name
RECONCILE_EVERY_S = 1.0


def model_health_name(model: str) -> str:
    """grpc.health.v1 service name that reports one model's readiness."""
    return f"{SERVICE_NAME}/{model}"


@dataclass
class ModelServerConfig:
    server_id: str
    models: list[ModelSpec]  # pinned on the command line; placements add more
    listen: str = "127.0.0.1:7001"
    advertise: str = ""  # address routers dial; defaults to listen
    region: str = "local"
    zone: str = "local-a"
    etcd: str = "127.0.0.1:2379"
    metrics: str = "127.0.0.1:0"  # "" disables /metrics
    lease_ttl: int = 10
    memory_bytes: int = 0  # budget for placed models (0 = unlimited)
    shutdown_grace_s: float = 15.0
    idle_unload_s: float = 300.0
    failure_backoff_s: float = 60.0
    engine_options: dict = field(default_factory=dict)  # defaults for placed models
    labels: dict[str, str] = field(default_factory=dict)
    model_dirs: list[str] = field(default_factory=list)  # where placed models' sources resolve
    #: A caller that reads nothing for this long has its generation cancelled.
    slow_consumer_s: float = 60.0
    #: The shared cache store (redis://host:port/db); '' = no shared tier and no response cache.
    cache_store: str = ""


class _Registration:
    """Keeps ServerInfo and per-model status keys on the lease, and health, in step with models.

    Status changes are applied one at a time, in order, so etcd never ends on a stale state.
    """

    def __init__(self, info: modelserver_pb2.ServerInfo) -> None:
        self.info = info
        self.manager: ModelManager | None = None
        self.keeper: LeaseKeeper | None = None
        self.health: health.aio.HealthServicer | None = None
        self._queue: asyncio.Queue[tuple[str, cp.ModelStatus | None]] = asyncio.Queue()
        self._worker: asyncio.Task | None = None

    def on_status(self, model: str, status: cp.ModelStatus | None) -> None:
        self._queue.put_nowait((model, status))
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._drain(), name="status-publisher")

    async def _drain(self) -> None:
        while True:
            model, status = await self._queue.get()
            try:
                await self._apply(model, status)
            except Exception:
                log.exception("could not publish the status of %s", model)
            finally:
                self._queue.task_done()

    async def _apply(self, model: str, status: cp.ModelStatus | None) -> None:
        assert self.keeper is not None and self.health is not None
        key = keyspace.status_key(self.info.server_id, model)
        serving = status is not None and status.state == cp.MODEL_STATE_READY
        await set_serving(self.health, [model_health_name(model)], serving)
        if self.manager is not None:
            self.info.models[:] = self.manager.ready_models()
            self.info.backend = self.manager.backend
            self.info.simulated = self.manager.simulated
        if status is None:
            await self.keeper.delete(key)
        else:
            await self.keeper.put(key, keyspace.encode(status))
        await self.keeper.put(keyspace.server_key(self.info.server_id), keyspace.encode(self.info))

    async def flush(self) -> None:
        """Returns once every status change so far has been applied (not merely dequeued)."""
        await self._queue.join()

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()


async def _follow_placements(config: ModelServerConfig, etcd: EtcdClient, manager: ModelManager,
                             servicer: ModelServerServicer, stop: asyncio.Event) -> None:
    """Load and release models as the leader's placements for this server come and go."""
    wake = asyncio.Event()
    placements = PrefixMirror(etcd, keyspace.placement_prefix(config.server_id),
                              on_change=lambda key, value: wake.set())
    await placements.start()
    try:
        while not stop.is_set():
            manager.follow(placements.items)
            await manager.reconcile()
            servicer.update_gauges()
            wake.clear()
            stopped = asyncio.create_task(stop.wait())
            woken = asyncio.create_task(wake.wait())
            await asyncio.wait({stopped, woken}, timeout=RECONCILE_EVERY_S, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            woken.cancel()
    finally:
        await placements.stop()


async def run(config: ModelServerConfig, stop: asyncio.Event) -> None:
    cache_runtime.configure(config.cache_store)
    info = modelserver_pb2.ServerInfo(
        server_id=config.server_id, region=config.region, zone=config.zone,
        memory_bytes=config.memory_bytes, labels=config.labels, started_at_ms=now_ms())
    registration = _Registration(info)
    manager = ModelManager(config.server_id, config.models, config.memory_bytes, registration.on_status,
                           config.idle_unload_s, config.failure_backoff_s, config.engine_options, config.model_dirs)
    registration.manager = manager
    servicer = ModelServerServicer(manager, lambda: info, config.slow_consumer_s)

    def register(parts: ReplicaParts) -> None:
        registration.keeper, registration.health = parts.keeper, parts.health
        modelserver_pb2_grpc.add_ModelServerServiceServicer_to_server(servicer, parts.server)

    def record(parts: ReplicaParts) -> modelserver_pb2.ServerInfo:
        info.address, info.metrics_address = parts.address, parts.metrics_address
        return info

    async def prepare(parts: ReplicaParts) -> None:
        await manager.start_pinned()
        await registration.flush()

    async def drain() -> None:
        servicer.accepting = False
        log.info("model server %s draining %d request(s)", config.server_id, manager.in_flight())
        await manager.wait_idle(config.shutdown_grace_s)

    try:
        async with run_replica(
                key=keyspace.server_key(config.server_id), replica_id=config.server_id,
                service_names=[SERVICE_NAME], register=register, record=record, listen=config.listen,
                advertise=config.advertise, etcd=config.etcd, metrics=config.metrics,
                lease_ttl=config.lease_ttl, grace_s=1.0, watch_mesh=False, prepare=prepare,
                drain=drain) as parts:
            log.info("model server %s serving (pinned: %s)", config.server_id,
                     ", ".join(manager.ready_models()) or "none")
            await _follow_placements(config, parts.etcd, manager, servicer, stop)
            await registration.stop()  # no status writes once the lease is revoked
    finally:
        await manager.stop()
