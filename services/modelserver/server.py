"""A model server process: load models, serve ModelServerService, register in etcd on a lease.

Shutdown order matters for "nothing is lost": stop accepting, leave membership (routers stop
picking us), let in-flight requests finish within the grace period, then stop engines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

from services.common import keyspace
from services.common.etcd_client import EtcdClient, LeaseKeeper
from services.common.grpc_util import bind, new_server, set_serving
from services.common.lifecycle import now_ms
from services.common.metrics import serve_metrics

from .engine import ModelSpec
from .host import ModelHost
from .servicer import ModelServerServicer

log = logging.getLogger(__name__)

SERVICE_NAME = modelserver_pb2.DESCRIPTOR.services_by_name["ModelServerService"].full_name


def model_health_name(model: str) -> str:
    """grpc.health.v1 service name that reports one model's readiness."""
    return f"{SERVICE_NAME}/{model}"


@dataclass
class ModelServerConfig:
    server_id: str
    models: list[ModelSpec]
    listen: str = "127.0.0.1:7001"
    advertise: str = ""  # address routers dial; defaults to listen
    region: str = "local"
    zone: str = "local-a"
    etcd: str = "127.0.0.1:2379"
    metrics: str = "127.0.0.1:0"  # "" disables /metrics
    lease_ttl: int = 10
    memory_bytes: int = 0
    shutdown_grace_s: float = 15.0
    labels: dict[str, str] = field(default_factory=dict)


async def run(config: ModelServerConfig, stop: asyncio.Event) -> None:
    host = ModelHost(config.models)
    started_ms = now_ms()
    info = modelserver_pb2.ServerInfo(
        server_id=config.server_id, region=config.region, zone=config.zone,
        memory_bytes=config.memory_bytes, labels=config.labels, started_at_ms=started_ms)

    servicer = ModelServerServicer(host, lambda: info)
    server, health = new_server([SERVICE_NAME])
    modelserver_pb2_grpc.add_ModelServerServiceServicer_to_server(servicer, server)
    port = bind(server, config.listen)
    listen_host = config.listen.rpartition(":")[0]
    info.address = config.advertise or f"{listen_host}:{port}"
    info.metrics_address = serve_metrics(config.metrics)
    await set_serving(health, ["", SERVICE_NAME], False)
    await server.start()
    log.info("model server %s listening on %s; loading %d model(s)", config.server_id,
             info.address, len(config.models))

    etcd = EtcdClient(config.etcd)
    keeper = LeaseKeeper(etcd, ttl=config.lease_ttl)
    health_names = ["", SERVICE_NAME]
    try:
        await host.start()
        info.models[:] = host.models()
        info.backend = host.backend
        info.simulated = host.simulated
        health_names = ["", SERVICE_NAME] + [model_health_name(m) for m in host.models()]
        await set_serving(health, health_names, True)
        await keeper.put(keyspace.server_key(config.server_id), keyspace.encode(info))
        await keeper.start()
        log.info("model server %s serving %s", config.server_id, ", ".join(host.models()))
        while not stop.is_set():
            servicer.update_gauges()
            try:
                await asyncio.wait_for(stop.wait(), 1.0)
            except asyncio.TimeoutError:
                pass
    finally:
        log.info("model server %s stopping: leaving membership, draining %d request(s)",
                 config.server_id, servicer.in_flight)
        servicer.accepting = False
        await set_serving(health, health_names, False)
        await keeper.stop(revoke=True)
        deadline = time.monotonic() + config.shutdown_grace_s
        while servicer.in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await server.stop(grace=1.0)
        await host.stop()
        await etcd.close()
        log.info("model server %s stopped", config.server_id)
