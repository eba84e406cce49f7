"""The lifecycle shared by router and control-plane replicas: serve gRPC, watch the mesh,
register on a lease, and take it all down in order."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import grpc
from meshserve.v1 import controlplane_pb2

from . import keyspace
from .etcd_client import EtcdClient, LeaseKeeper
from .grpc_util import bind, new_server, set_serving
from .lifecycle import now_ms
from .membership import MeshView
from .metrics import serve_metrics

log = logging.getLogger(__name__)


@asynccontextmanager
async def run_replica(*, key: Callable[[str], str], replica_id: str, service_name: str,
                      register: Callable[[grpc.aio.Server, EtcdClient, MeshView], None],
                      listen: str, advertise: str, region: str, zone: str, etcd: str,
                      metrics: str, lease_ttl: int, grace_s: float,
                      extra_service_names: Sequence[str] = ()
                      ) -> AsyncIterator[tuple[EtcdClient, MeshView, controlplane_pb2.ReplicaInfo]]:
    """Yields once the replica serves and is registered; stops everything on exit.

    `extra_service_names`: further services `register` adds, for health and reflection.
    """
    client = EtcdClient(etcd)
    view = MeshView(client)
    server, health = new_server([service_name, *extra_service_names])
    register(server, client, view)
    port = bind(server, listen)
    info = controlplane_pb2.ReplicaInfo(
        replica_id=replica_id, address=advertise or f"{listen.rpartition(':')[0]}:{port}",
        region=region, zone=zone, metrics_address=serve_metrics(metrics), started_at_ms=now_ms())
    names = ["", service_name, *extra_service_names]
    await set_serving(health, names, False)
    await server.start()
    keeper = LeaseKeeper(client, ttl=lease_ttl)
    try:
        await view.start()
        await keeper.put(key(replica_id), keyspace.encode(info))
        await keeper.start()
        await set_serving(health, names, True)
        log.info("%s serving on %s (%d server(s) known)", replica_id, info.address,
                 len(view.servers))
        yield client, view, info
    finally:
        log.info("%s stopping", replica_id)
        await set_serving(health, names, False)
        await keeper.stop(revoke=True)
        await server.stop(grace=grace_s)
        await view.stop()
        await client.close()
        log.info("%s stopped", replica_id)
