"""A control-plane replica: answers the operator API (and the autoscaling API, and KEDA's external
scaler protocol) from etcd state; while it leads, it also checks health, releases drains, decides
replica counts and places models. Never on the request path."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from externalscaler import externalscaler_pb2_grpc
from meshserve.v1 import auth_pb2_grpc, autoscale_pb2_grpc, controlplane_pb2, controlplane_pb2_grpc, traffic_pb2_grpc

from services.common import grpc_util, keyspace
from services.common.lifecycle import now_ms
from services.common.replica import ReplicaParts, run_replica
from services.common.tasks import stop_tasks

from . import canary, metrics
from .auth_servicer import SERVICE_NAME as AUTH_SERVICE_NAME
from .auth_servicer import AuthServicer
from .autoscaler import keda
from .autoscaler import servicer as autoscale_servicer
from .autoscaler.autoscaler import Autoscaler
from .autoscaler.signals import SignalFeed
from .election import Election
from .halts import DEFAULT_HALT_AFTER
from .health import HealthChecker, HealthSettings
from .operator_gate import OperatorGate
from .probes import ServerProbe
from .reconciler import Reconciler
from .servicer import ControlPlaneServicer
from .traffic_servicer import SERVICE_NAME as TRAFFIC_SERVICE_NAME
from .traffic_servicer import TrafficServicer

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
    election_ttl: int = 5
    reconcile_interval_s: float = 1.0
    #: Stop placing a model after its load failed on this many distinct servers (0 = never).
    halt_after_failures: int = DEFAULT_HALT_AFTER
    #: How often the leader's autoscaler measures and decides.
    autoscale_interval_s: float = 1.0
    health: HealthSettings = field(default_factory=HealthSettings)


def _on_leadership(leading: bool) -> None:
    metrics.LEADER_CHANGES.labels("gained" if leading else "lost").inc()
    metrics.IS_LEADER.set(1 if leading else 0)


async def run(config: ControlPlaneConfig, stop: asyncio.Event) -> None:
    probe = ServerProbe()
    started = now_ms()
    gate = OperatorGate(secure=grpc_util.current_tls() is not None)
    scalers: list[Autoscaler] = []  # made once leadership can be followed (below)

    def register(parts: ReplicaParts) -> None:
        assert parts.view is not None
        controlplane_pb2_grpc.add_ControlPlaneServiceServicer_to_server(
            ControlPlaneServicer(parts.etcd, parts.view, config.replica_id, probe), parts.server)
        traffic_pb2_grpc.add_TrafficServiceServicer_to_server(TrafficServicer(parts.etcd, parts.view), parts.server)
        auth = AuthServicer(parts.etcd)
        auth_pb2_grpc.add_AuthServiceServicer_to_server(auth, parts.server)
        gate.audit = auth.ops.audit
        autoscale_pb2_grpc.add_AutoscaleServiceServicer_to_server(
            autoscale_servicer.AutoscaleServicer(parts.etcd, parts.view, config.replica_id,
                                                 lambda: scalers[0] if scalers else None),
            parts.server)
        externalscaler_pb2_grpc.add_ExternalScalerServicer_to_server(
            keda.ExternalScalerServicer(parts.view), parts.server)

    def record(parts: ReplicaParts) -> controlplane_pb2.ReplicaInfo:
        return controlplane_pb2.ReplicaInfo(replica_id=config.replica_id, address=parts.address,
                                            region=config.region, metrics_address=parts.metrics_address,
                                            started_at_ms=started)

    async with run_replica(
            key=keyspace.controlplane_key(config.replica_id), replica_id=config.replica_id,
            service_names=[SERVICE_NAME, TRAFFIC_SERVICE_NAME, autoscale_servicer.SERVICE_NAME,
                           keda.SERVICE_NAME, AUTH_SERVICE_NAME],
            register=register, record=record, listen=config.listen, interceptors=[gate],
            advertise=config.advertise, etcd=config.etcd, metrics=config.metrics,
            lease_ttl=config.lease_ttl, grace_s=2.0) as parts:
        etcd, view = parts.etcd, parts.view
        assert view is not None
        election = Election(etcd, config.replica_id, parts.address, ttl=config.election_ttl,
                            on_change=_on_leadership)
        checker = HealthChecker(view, probe, config.replica_id, config.health)
        feed = SignalFeed(view, interval_s=config.autoscale_interval_s)
        scalers.append(Autoscaler(etcd, view, election, config.replica_id, feed,
                                  interval_s=config.autoscale_interval_s))
        reconciler = Reconciler(etcd, view, election, checker, probe,
                                interval_s=config.reconcile_interval_s,
                                halt_after=config.halt_after_failures, autoscaler=scalers[0])
        scalers[0].wake = reconciler.wake
        election.start()
        tasks = [asyncio.create_task(reconciler.run(), name="reconciler"),
                 asyncio.create_task(feed.run(lambda: election.is_leader), name="autoscale-signals")]
        canary_task = asyncio.create_task(
            canary.CanaryController(etcd, view, election, config.replica_id).run(), name="canary")
        try:
            await stop.wait()
        finally:
            await canary.stop(canary_task)
            await stop_tasks(tasks)
            await election.stop()
            await probe.close()
