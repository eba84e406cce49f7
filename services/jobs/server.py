"""Where asynchronous serving runs: the API in every router, the work in job-worker processes.

Routers serve JobService (stateless: every record is in JetStream), so clients reach it through
Envoy like the rest of the public API. Workers are their own processes (`meshserve jobworker`):
each builds the same request path as a router (MeshView, BackendPool, Dispatcher), so jobs get
validation, routing, retries and migration, and reads the replicas' loads from the same load
streams; but its CPU work (store round trips, record encoding, batch planning and finalizing)
never runs on a router's event loop next to interactive streams, it scales (and can be stopped)
apart from the routers, and a worker crash never drops an interactive request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field, replace

from meshserve.v1 import controlplane_pb2 as cp

from services.common import grpc_util, keyspace
from services.common.auth_records import KeySet
from services.common.etcd_client import PrefixMirror
from services.common.lifecycle import now_ms
from services.common.replica import ReplicaParts, run_replica
from services.common.tasks import stop_task
from services.router.access import Access
from services.router.config import DispatchSettings
from services.router.dispatch import Dispatcher
from services.router.pool import BackendPool
from services.router.traffic.table import TrafficTable

from .batches import BatchKeeper
from .batches_api import BatchApi
from .execute import Executor
from .jobs_api import JobApi
from .lines import BatchCache, LineRunner
from .servicer import JobServicer
from .store import JobStore, StoreErrors, StoreSettings
from .worker import JobWorker, WorkerSettings

log = logging.getLogger(__name__)


async def connect(store: JobStore, name: str, stop: asyncio.Event | None = None) -> None:
    """Connect, retrying every second until it works (JetStream may start after us)."""
    while True:
        try:
            await store.connect(name)
            log.info("job store connected (%s)", ", ".join(store.settings.servers))
            return
        except StoreErrors as exc:
            log.warning("job store %s not reachable (%s); retrying", ", ".join(store.settings.servers), exc)
            await store.close()
        if stop is not None and stop.is_set():
            raise asyncio.CancelledError
        await asyncio.sleep(1.0)


class RouterJobs:
    """JobService inside a router: registered at once, answering once the store is connected."""

    def __init__(self, settings: StoreSettings, router_id: str, access: Access | None = None) -> None:
        self.store = JobStore(settings)
        self.servicer = JobServicer(access)
        self._name = router_id
        self._task: asyncio.Task | None = None

    def start(self, dispatcher: Dispatcher) -> None:
        async def go() -> None:
            await connect(self.store, self._name)
            self.servicer.attach(JobApi(self.store, dispatcher.known_models), BatchApi(self.store))
        self._task = asyncio.get_running_loop().create_task(go(), name="job-store")

    async def close(self) -> None:
        await stop_task(self._task)
        with contextlib.suppress(*StoreErrors):
            await self.store.close()


async def _count_peers(parts: ReplicaParts, worker: JobWorker, stop: asyncio.Event) -> None:
    """How many job workers are registered (each takes its share of the spare capacity)."""
    while not stop.is_set():
        try:
            found, _ = await parts.etcd.get_prefix(keyspace.JOBWORKERS)
            worker.peers = max(1, len(found))
        except Exception as exc:  # noqa: BLE001 - etcd away: keep the last count
            log.debug("counting job workers: %s", exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 5.0)


@dataclass
class JobWorkerConfig:
    worker_id: str
    store: StoreSettings
    listen: str = "127.0.0.1:0"
    region: str = "local"
    zone: str = ""
    etcd: str = "127.0.0.1:2379"
    metrics: str = "127.0.0.1:0"
    lease_ttl: int = 10
    fill: float = 0.5
    max_in_flight: int = 64
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)


async def run_worker(config: JobWorkerConfig, stop: asyncio.Event) -> None:
    settings = replace(config.dispatch, region=config.region, zone=config.zone)
    settings.validate()
    started = now_ms()
    holder: dict[str, ReplicaParts] = {}
    keys = KeySet()  # tenants' model grants, for the lines of a tenant's batch
    mirrors: list[PrefixMirror] = []

    async def prepare(parts: ReplicaParts) -> None:
        mirror = PrefixMirror(parts.etcd, keyspace.AUTH, keys.apply)
        await mirror.start()
        mirrors.append(mirror)

    async def drain() -> None:
        while mirrors:
            await mirrors.pop().stop()

    def register(parts: ReplicaParts) -> None:
        holder["parts"] = parts

    def record(parts: ReplicaParts) -> cp.ReplicaInfo:
        return cp.ReplicaInfo(replica_id=config.worker_id, address=parts.address, region=config.region,
                              zone=config.zone, metrics_address=parts.metrics_address, started_at_ms=started)

    async with run_replica(key=keyspace.jobworker_key(config.worker_id), replica_id=config.worker_id,
                           service_names=[], register=register, record=record, listen=config.listen, advertise="",
                           etcd=config.etcd, metrics=config.metrics, lease_ttl=config.lease_ttl,
                           grace_s=1.0, prepare=prepare, drain=drain) as parts:
        assert parts.view is not None
        pool = BackendPool(parts.view, hang_timeout_s=settings.hang_timeout_s)
        # run_replica has loaded the view already and the pool hears only later changes: without
        # this a worker (re)started in a steady mesh saw no replica until some etcd key changed
        pool.sync()
        # the process's certificate, known once meshserve.py configured it: TLS to JetStream
        store = JobStore(replace(config.store, tls=config.store.tls or grpc_util.current_tls()))
        try:
            dispatcher = Dispatcher(pool, config.worker_id, settings, TrafficTable(parts.view))
            await connect(store, config.worker_id, stop)
            cache = BatchCache(store)
            worker = JobWorker(store, pool, Executor(dispatcher), WorkerSettings(
                config.worker_id, fill=config.fill, max_in_flight=config.max_in_flight), line_runner=LineRunner(cache),
                dispatcher=dispatcher)
            keeper = BatchKeeper(store, dispatcher.known_models, cache, config.worker_id,
                                 may_call=keys.may_call if grpc_util.current_tls() is not None else None)
            await asyncio.gather(worker.run(stop), keeper.run(stop), _count_peers(parts, worker, stop))
        finally:
            with contextlib.suppress(*StoreErrors):
                await store.close()
            await pool.close()
