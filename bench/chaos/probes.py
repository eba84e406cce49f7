"""Is a process serving? One bounded check each, and `until` to time how long that takes.

Every check opens a fresh connection, so a client's reconnect backoff never delays the moment
a restarted process is seen serving.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve.v1 import (
    controlplane_pb2,
    controlplane_pb2_grpc,
    inference_pb2,
    inference_pb2_grpc,
    modelserver_pb2,
    modelserver_pb2_grpc,
)

from services.localmesh import components as c

CHECK_TIMEOUT_S = 1.0


async def until(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.1) -> float | None:
    """Poll until `check` holds; the monotonic time it first did, or None if not within timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if await check():
                return time.monotonic()
        except Exception:  # noqa: BLE001 - not yet
            pass
        await asyncio.sleep(interval)
    return None


async def server_generates(address: str, model: str) -> bool:
    """A one-token generation served by this model server itself."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = modelserver_pb2_grpc.ModelServerServiceStub(ch)
        req = modelserver_pb2.ModelServerServiceGenerateRequest(request_id="chaos-probe", model=model,
                                                                prompt="probe")
        req.sampling.max_tokens = 1
        chunks = [x async for x in stub.Generate(req, timeout=CHECK_TIMEOUT_S)]
        return bool(chunks) and bool(chunks[-1].finish_reason)


async def router_generates(address: str, model: str) -> bool:
    """A one-token streamed answer through this router itself."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        req = inference_pb2.GenerateRequest(model=model, prompt="probe")
        req.sampling.max_tokens = 1
        chunks = [x async for x in stub.GenerateStream(req, timeout=CHECK_TIMEOUT_S)]
        return bool(chunks) and bool(chunks[-1].finish_reason)


async def health_serving(address: str) -> bool:
    async with grpc.aio.insecure_channel(address) as ch:
        resp = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(),
                                                          timeout=CHECK_TIMEOUT_S)
        return resp.status == health_pb2.HealthCheckResponse.SERVING


async def etcd_healthy(client: str) -> bool:
    return await asyncio.to_thread(c.etcd_healthy, client)


def _etcd_status(client: str) -> dict:
    req = urllib.request.Request(f"http://{client}/v3/maintenance/status", data=b"{}", method="POST")
    with urllib.request.urlopen(req, timeout=CHECK_TIMEOUT_S) as resp:
        return json.loads(resp.read())


async def etcd_leader_index(clients: list[str]) -> int | None:
    """Which member (index into clients) is etcd's raft leader, asked of each member."""
    for i, client in enumerate(clients):
        try:
            st = await asyncio.to_thread(_etcd_status, client)
        except Exception:  # noqa: BLE001 - ask the next member
            continue
        if str(st.get("header", {}).get("member_id")) == str(st.get("leader")):
            return i
    return None


def _healthy_hosts(admin: str) -> int:
    with urllib.request.urlopen(f"http://{admin}/clusters?format=json", timeout=CHECK_TIMEOUT_S) as resp:
        data = json.loads(resp.read())
    n = 0
    for cluster in data.get("cluster_statuses", []):
        if cluster.get("name") != "routers":
            continue
        for host in cluster.get("host_statuses", []):
            hs = host.get("health_status", {})
            n += hs.get("eds_health_status") == "HEALTHY" and not any(k.startswith("failed") for k in hs)
    return n


def _envoy_bytes(admin: str) -> dict[str, int]:
    with urllib.request.urlopen(f"http://{admin}/stats?format=json", timeout=CHECK_TIMEOUT_S) as resp:
        stats = {s.get("name"): s.get("value", 0) for s in json.loads(resp.read()).get("stats", [])}
    return {"from_routers": int(stats.get("cluster.routers.upstream_cx_rx_bytes_total", 0)),
            "to_clients": sum(int(v) for k, v in stats.items() if isinstance(k, str) and k.startswith("http.")
                              and k.endswith(".downstream_cx_tx_bytes_total") and ".admin." not in k)}


async def envoy_bytes(admin: str) -> dict[str, int]:
    """Bytes Envoy received from the routers and sent to clients so far (its own counters): the
    difference is what it holds or dropped."""
    return await asyncio.to_thread(_envoy_bytes, admin)


async def envoy_healthy_routers(admin: str) -> int:
    """Routers Envoy currently considers healthy (its active health checks)."""
    return await asyncio.to_thread(_healthy_hosts, admin)


async def leader(controlplanes: list[str]) -> tuple[controlplane_pb2.LeaderRecord, str]:
    """(the leader's record, the replica that answered), asking each control plane in turn."""
    last: Exception | None = None
    for address in controlplanes:
        try:
            async with grpc.aio.insecure_channel(address) as ch:
                stub = controlplane_pb2_grpc.ControlPlaneServiceStub(ch)
                r = await stub.GetLeader(controlplane_pb2.GetLeaderRequest(), timeout=CHECK_TIMEOUT_S * 2)
                return r.leader, r.answered_by
        except grpc.aio.AioRpcError as exc:
            last = exc
    raise RuntimeError(f"no control plane answered GetLeader: {last}")


async def cluster_status(address: str) -> controlplane_pb2.GetClusterStatusResponse:
    async with grpc.aio.insecure_channel(address) as ch:
        stub = controlplane_pb2_grpc.ControlPlaneServiceStub(ch)
        return await stub.GetClusterStatus(controlplane_pb2.GetClusterStatusRequest(),
                                           timeout=CHECK_TIMEOUT_S * 3)


async def ready_replicas(stub: inference_pb2_grpc.InferenceServiceStub) -> dict[str, int]:
    """Ready replicas per model, as Envoy's routers see them."""
    resp = await stub.ListModels(inference_pb2.ListModelsRequest(), timeout=CHECK_TIMEOUT_S * 3)
    return {m.name: m.ready_replicas for m in resp.models}
