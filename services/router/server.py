"""A router process: watch membership, serve InferenceService, register on a lease."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field, replace

from inference import grpc_service_pb2_grpc as kserve_pb2_grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import inference_pb2, inference_pb2_grpc, jobs_pb2_grpc, routerload_pb2_grpc

from services.common import grpc_util, keyspace
from services.common.auth_records import KeySet
from services.common.etcd_client import PrefixMirror
from services.common.lifecycle import now_ms
from services.common.membership import MeshView
from services.common.replica import ReplicaParts, run_replica
from services.jobs.server import RouterJobs
from services.jobs.servicer import SERVICE_NAME as JOBS_SERVICE_NAME
from services.jobs.store import StoreSettings

from .access import Access
from .config import DispatchSettings
from .dispatch import Dispatcher
from .edge_authz import EdgeAuthz
from .kserve.servicer import SERVICE_NAME as KSERVE_SERVICE_NAME
from .kserve.servicer import KServeServicer
from .load_servicer import SERVICE_NAME as LOAD_SERVICE_NAME
from .load_servicer import RouterLoadServicer
from .pool import BackendPool
from .quota import TenantQuotas
from .servicer import InferenceServicer
from .traffic.stats import CanaryRecorder
from .traffic.table import TrafficTable

SERVICE_NAME = inference_pb2.DESCRIPTOR.services_by_name["InferenceService"].full_name


@dataclass
class RouterConfig:
    router_id: str
    listen: str = "127.0.0.1:8001"
    advertise: str = ""
    region: str = "local"
    zone: str = ""
    etcd: str = "127.0.0.1:2379"
    metrics: str = "127.0.0.1:0"
    lease_ttl: int = 10
    shutdown_grace_s: float = 10.0
    #: The request path's knobs (policy, retries, shedding); region and zone come from above.
    dispatch: DispatchSettings = field(default_factory=DispatchSettings)
    #: host:port of the ext_authz HTTP check Envoy calls for every public request ('' = none).
    authz_listen: str = ""
    #: JetStream servers for JobService (asynchronous jobs and batches); empty: not served.
    jetstream: tuple[str, ...] = ()
    jetstream_replicas: int = 1


class _EdgeAuth:
    """Tenants and API keys mirrored from etcd (known before the router reports SERVING) and the
    ext_authz check Envoy calls."""

    def __init__(self, keys: KeySet, authz_listen: str) -> None:
        self.keys, self.authz_listen = keys, authz_listen
        self.parts: list[PrefixMirror | EdgeAuthz] = []

    async def prepare(self, parts: ReplicaParts) -> None:
        mirror = PrefixMirror(parts.etcd, keyspace.AUTH, self.keys.apply)
        await mirror.start()
        self.parts.append(mirror)
        if self.authz_listen:
            authz = EdgeAuthz(self.keys, self.authz_listen, grpc_util.current_tls())
            await authz.start()
            self.parts.append(authz)

    async def stop(self) -> None:
        """Before etcd closes (run_replica's drain step), so the mirror's watch ends cleanly."""
        while self.parts:
            await self.parts.pop().stop()


async def run(config: RouterConfig, stop: asyncio.Event) -> None:
    pools: list[BackendPool] = []
    recorders: list[CanaryRecorder] = []
    settings = replace(config.dispatch, region=config.region, zone=config.zone)
    settings.validate()
    started = now_ms()
    keys = KeySet()
    views: list[MeshView] = []
    quotas = TenantQuotas(keys, routers=lambda: len(views[0].routers) if views else 1)
    access = Access(keys, enforce=grpc_util.current_tls() is not None, quotas=quotas)
    jobs = RouterJobs(StoreSettings(servers=config.jetstream, replicas=config.jetstream_replicas,
                                    tls=grpc_util.current_tls()),
                      config.router_id, access) if config.jetstream else None
    edge = _EdgeAuth(keys, config.authz_listen)

    def register(parts: ReplicaParts) -> None:
        assert parts.view is not None
        views.append(parts.view)
        pool = BackendPool(parts.view, hang_timeout_s=settings.hang_timeout_s)
        pools.append(pool)
        recorder = CanaryRecorder(config.router_id, parts.keeper.put, parts.keeper.delete)
        recorders.append(recorder)
        dispatcher = Dispatcher(pool, config.router_id, settings, TrafficTable(parts.view), recorder)
        inference_pb2_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(dispatcher, access), parts.server)
        kserve_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(KServeServicer(dispatcher, access), parts.server)
        routerload_pb2_grpc.add_RouterLoadServiceServicer_to_server(RouterLoadServicer(dispatcher), parts.server)
        if jobs is not None:
            jobs_pb2_grpc.add_JobServiceServicer_to_server(jobs.servicer, parts.server)
            jobs.start(dispatcher)

    def record(parts: ReplicaParts) -> cp.ReplicaInfo:
        return cp.ReplicaInfo(replica_id=config.router_id, address=parts.address, region=config.region,
                              zone=config.zone, metrics_address=parts.metrics_address, started_at_ms=started)

    try:
        async with run_replica(
                key=keyspace.router_key(config.router_id), replica_id=config.router_id,
                service_names=[SERVICE_NAME, KSERVE_SERVICE_NAME, LOAD_SERVICE_NAME,
                               *([JOBS_SERVICE_NAME] if jobs else [])],
                register=register, record=record,
                listen=config.listen, advertise=config.advertise, etcd=config.etcd, metrics=config.metrics,
                lease_ttl=config.lease_ttl, grace_s=config.shutdown_grace_s, prepare=edge.prepare,
                drain=edge.stop):
            await stop.wait()
    finally:
        await edge.stop()
        for recorder in recorders:
            await recorder.close()
        if jobs is not None:
            await jobs.close()
        for pool in pools:
            await pool.close()
