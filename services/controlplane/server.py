"""A control-plane replica: serves the operator API from etcd state; never on the request path."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from meshserve.v1 import controlplane_pb2, controlplane_pb2_grpc

from services.common import keyspace
from services.common.replica import run_replica

from .servicer import ControlPlaneServicer

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
    def register(server, etcd, view) -> None:
        controlplane_pb2_grpc.add_ControlPlaneServiceServicer_to_server(
            ControlPlaneServicer(etcd, view, config.replica_id), server)

    async with run_replica(
            key=keyspace.controlplane_key, replica_id=config.replica_id, service_name=SERVICE_NAME,
            register=register, listen=config.listen, advertise=config.advertise,
            region=config.region, zone="", etcd=config.etcd, metrics=config.metrics,
            lease_ttl=config.lease_ttl, grace_s=2.0):
        await stop.wait()
