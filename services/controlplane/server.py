"""A control-plane replica: serves the operator API from etcd state; never on the request path."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from meshserve.v1 import controlplane_pb2, controlplane_pb2_grpc

from services.common import keyspace
from services.common.etcd_client import EtcdClient, LeaseKeeper
from services.common.grpc_util import bind, new_server, set_serving
from services.common.lifecycle import now_ms
from services.common.membership import MeshView
from services.common.metrics import serve_metrics

from .servicer import ControlPlaneServicer

log = logging.getLogger(__name__)

SERVICE_NAME = controlplane_pb2.DESCRIPTOR.services_by_name["ControlPlaneService"].full_name


@dataclass
class ControlPlaneConfig:
    replica_id: str
    listen: str = "127.0.0.1:9001"
    advertise: str = ""
    region: str = "local"
    etcd: str = "127.0.0.1:2379"
    metrics: str = "127.0.0.1:0"
    lease_ttl: int = 10


async def run(config: ControlPlaneConfig, stop: asyncio.Event) -> None:
    etcd = EtcdClient(config.etcd)
    view = MeshView(etcd)
    server, health = new_server([SERVICE_NAME])
    controlplane_pb2_grpc.add_ControlPlaneServiceServicer_to_server(
        ControlPlaneServicer(etcd, view, config.replica_id), server)
    port = bind(server, config.listen)
    address = config.advertise or f"{config.listen.rpartition(':')[0]}:{port}"
    info = controlplane_pb2.ReplicaInfo(
        replica_id=config.replica_id, address=address, region=config.region,
        metrics_address=serve_metrics(config.metrics), started_at_ms=now_ms())
    await set_serving(health, ["", SERVICE_NAME], False)
    await server.start()
    keeper = LeaseKeeper(etcd, ttl=config.lease_ttl)
    try:
        await view.start()
        await keeper.put(keyspace.controlplane_key(config.replica_id), keyspace.encode(info))
        await keeper.start()
        await set_serving(health, ["", SERVICE_NAME], True)
        log.info("control plane %s serving on %s", config.replica_id, address)
        await stop.wait()
    finally:
        await set_serving(health, ["", SERVICE_NAME], False)
        await keeper.stop(revoke=True)
        await server.stop(grace=2.0)
        await view.stop()
        await etcd.close()
        log.info("control plane %s stopped", config.replica_id)
