"""A router process: watch membership, serve InferenceService, register on a lease."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from meshserve.v1 import controlplane_pb2, inference_pb2, inference_pb2_grpc

from services.common import keyspace
from services.common.etcd_client import EtcdClient, LeaseKeeper
from services.common.grpc_util import bind, new_server, set_serving
from services.common.lifecycle import now_ms
from services.common.membership import MeshView
from services.common.metrics import serve_metrics

from .pool import BackendPool
from .servicer import InferenceServicer

log = logging.getLogger(__name__)

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


async def run(config: RouterConfig, stop: asyncio.Event) -> None:
    etcd = EtcdClient(config.etcd)
    view = MeshView(etcd)
    pool = BackendPool(view)
    servicer = InferenceServicer(pool, config.router_id)
    server, health = new_server([SERVICE_NAME])
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = bind(server, config.listen)
    address = config.advertise or f"{config.listen.rpartition(':')[0]}:{port}"
    info = controlplane_pb2.ReplicaInfo(
        replica_id=config.router_id, address=address, region=config.region, zone=config.zone,
        metrics_address=serve_metrics(config.metrics), started_at_ms=now_ms())
    await set_serving(health, ["", SERVICE_NAME], False)
    await server.start()
    keeper = LeaseKeeper(etcd, ttl=config.lease_ttl)
    try:
        await view.start()
        await keeper.put(keyspace.router_key(config.router_id), keyspace.encode(info))
        await keeper.start()
        await set_serving(health, ["", SERVICE_NAME], True)
        log.info("router %s serving on %s (%d server(s) known)", config.router_id, address,
                 len(view.servers))
        await stop.wait()
    finally:
        log.info("router %s stopping", config.router_id)
        await set_serving(health, ["", SERVICE_NAME], False)
        await keeper.stop(revoke=True)
        await server.stop(grace=config.shutdown_grace_s)
        await pool.close()
        await view.stop()
        await etcd.close()
        log.info("router %s stopped", config.router_id)
