"""The OpenAI gateway process: the HTTP API on `--http`, plus the lifecycle every MeshServe process
shares (gRPC health and reflection on `--listen`, metrics, a membership record on a lease under
/meshserve/gateways/).

Start: bind gRPC, start the HTTP listener (replica.py's `prepare`), register, SERVING (both the
gRPC health and GET /health, which Envoy checks). Stop: NOT_SERVING, leave membership, close the
HTTP listener and let answers in flight finish within the grace period, then close the upstream
channel.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from aiohttp import web
from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace
from services.common.lifecycle import now_ms
from services.common.ports import check_port_free
from services.common.replica import ReplicaParts, run_replica

from .app import Gateway, GatewaySettings, Serving
from .upstream import Upstream

log = logging.getLogger(__name__)

#: The name the gateway's gRPC health reports, besides the server-wide "".
SERVICE_NAME = "meshserve.v1.OpenAIGateway"


@dataclass
class GatewayConfig:
    gateway_id: str
    http: str = "127.0.0.1:8080"  # the OpenAI API
    upstream: str = "127.0.0.1:8000"  # InferenceService: Envoy, or a gRPC target of routers
    listen: str = "127.0.0.1:8090"  # gRPC health and reflection
    advertise: str = ""
    region: str = "local"
    etcd: str = "127.0.0.1:2379"
    metrics: str = "127.0.0.1:0"
    lease_ttl: int = 10
    shutdown_grace_s: float = 10.0
    settings: GatewaySettings = field(default_factory=GatewaySettings)


class _Http:
    """The aiohttp server inside the process's own event loop (no signal handling of its own)."""

    def __init__(self, app: web.Application, address: str, grace_s: float) -> None:
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, handler_cancellation=True,
                                     shutdown_timeout=grace_s)
        self._address = address
        self._started = False
        self.bound = ""

    async def start(self) -> None:
        host, _, port = self._address.rpartition(":")
        host = host.strip("[]")
        if int(port):
            check_port_free(host or "0.0.0.0", int(port))  # a taken port fails loudly
        await self._runner.setup()
        self._started = True
        site = web.TCPSite(self._runner, host or None, int(port), reuse_address=True)
        await site.start()
        sockets = self._runner.addresses
        self.bound = f"{host}:{sockets[0][1]}" if sockets else self._address
        log.info("OpenAI API on http://%s", self.bound)

    async def stop(self) -> None:
        if self._started:
            self._started = False
            await self._runner.cleanup()  # stops listening, then waits for handlers up to the grace


def _dialable(bound: str, advertised: str) -> str:
    """The HTTP address others can dial: a wildcard listener (0.0.0.0:8080 in a pod) takes the
    host of the advertised gRPC address (--advertise POD_IP:PORT)."""
    host, _, port = bound.rpartition(":")
    if host.strip("[]") in ("", "0.0.0.0", "::"):
        host = advertised.rpartition(":")[0]
    return f"{host}:{port}"


async def run(config: GatewayConfig, stop: asyncio.Event) -> None:
    upstream = Upstream(config.upstream)
    serving = Serving()
    http = _Http(Gateway(upstream, config.settings, serving).app(), config.http, config.shutdown_grace_s)
    started = now_ms()

    async def prepare(parts: ReplicaParts) -> None:
        await http.start()

    async def drain() -> None:
        serving.ready = False
        await http.stop()

    def record(parts: ReplicaParts) -> cp.ReplicaInfo:
        return cp.ReplicaInfo(replica_id=config.gateway_id, address=parts.address, region=config.region,
                              metrics_address=parts.metrics_address, started_at_ms=started,
                              http_address=_dialable(http.bound, parts.address))

    try:
        async with run_replica(
                key=keyspace.gateway_key(config.gateway_id), replica_id=config.gateway_id,
                service_names=[SERVICE_NAME], register=lambda parts: None, record=record,
                listen=config.listen, advertise=config.advertise, etcd=config.etcd, metrics=config.metrics,
                lease_ttl=config.lease_ttl, grace_s=2.0, watch_mesh=False, prepare=prepare, drain=drain):
            serving.ready = True
            log.info("OpenAI gateway %s: http://%s -> InferenceService at %s", config.gateway_id, http.bound,
                     config.upstream)
            await stop.wait()
            serving.ready = False
    finally:
        await upstream.close()
