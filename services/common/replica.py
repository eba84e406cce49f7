"""The lifecycle every MeshServe process shares (router, control plane, model server): serve gRPC,
optionally watch the mesh, register on a lease, and take it all down in order.

Start: bind (a taken port fails loudly), serve with health NOT_SERVING, `prepare` (a model server
loads its pinned models here), put the membership record on a lease, SERVING.
Stop: NOT_SERVING, revoke the lease (every router drops this replica at once), `drain` (a model
server lets in-flight requests finish), stop gRPC with a grace period, close etcd.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health

from . import keyspace
from .etcd_client import EtcdClient, LeaseKeeper
from .grpc_util import bind, new_server, set_serving
from .membership import MeshView
from .metrics import serve_metrics

log = logging.getLogger(__name__)


@dataclass
class ReplicaParts:
    """What a process's services are built from; `register` receives it before serving."""

    server: grpc.aio.Server
    etcd: EtcdClient
    view: MeshView | None  # None when the process does not watch the mesh
    keeper: LeaseKeeper  # keys put here live on this replica's lease
    health: health.aio.HealthServicer
    address: str = ""  # host:port others dial, once bound
    metrics_address: str = ""


@asynccontextmanager
async def run_replica(*, key: str, replica_id: str, service_names: Sequence[str],
                      register: Callable[[ReplicaParts], None],
                      record: Callable[[ReplicaParts], Message],
                      listen: str, advertise: str, etcd: str, metrics: str, lease_ttl: int, grace_s: float,
                      watch_mesh: bool = True,
                      prepare: Callable[[ReplicaParts], Awaitable[None]] | None = None,
                      drain: Callable[[], Awaitable[None]] | None = None,
                      interceptors: Sequence[grpc.aio.ServerInterceptor] = ()) -> AsyncIterator[ReplicaParts]:
    """Yields once the replica serves and is registered under `key`; stops everything on exit.

    `service_names`: the gRPC services `register` adds (for health and reflection).
    `record`: the membership record to put under `key`, built once the address is known.
    """
    client = EtcdClient(etcd)
    server, health_servicer = new_server(service_names, interceptors)
    parts = ReplicaParts(server=server, etcd=client, view=MeshView(client) if watch_mesh else None,
                         keeper=LeaseKeeper(client, ttl=lease_ttl), health=health_servicer)
    register(parts)
    port = bind(server, listen)
    parts.address = advertise or f"{listen.rpartition(':')[0]}:{port}"
    parts.metrics_address = serve_metrics(metrics)
    names = ["", *service_names]
    await set_serving(health_servicer, names, False)
    await server.start()
    try:
        if parts.view is not None:
            await parts.view.start()
        if prepare is not None:
            await prepare(parts)
        await parts.keeper.put(key, keyspace.encode(record(parts)))
        await parts.keeper.start()
        await set_serving(health_servicer, names, True)
        log.info("%s serving on %s", replica_id, parts.address)
        yield parts
    finally:
        log.info("%s stopping: leaving membership", replica_id)
        await set_serving(health_servicer, names, False)
        await parts.keeper.stop(revoke=True)
        if drain is not None:
            await drain()
        await server.stop(grace=grace_s)
        if parts.view is not None:
            await parts.view.stop()
        await client.close()
        log.info("%s stopped", replica_id)
