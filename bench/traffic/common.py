"""What the traffic benchmark's phases share: control-plane calls, waiting for READY, policies."""

from __future__ import annotations

import asyncio
import time

import grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc, traffic_pb2_grpc
from meshserve.v1 import traffic_pb2 as tp

from services.localmesh.mesh import LocalMesh


class Control:
    """Async stubs on the first control plane and on every router (for readiness)."""

    def __init__(self, mesh: LocalMesh) -> None:
        self._channels = [grpc.aio.insecure_channel(mesh.controlplane),
                          *(grpc.aio.insecure_channel(r) for r in mesh.routers)]
        self.cp = controlplane_pb2_grpc.ControlPlaneServiceStub(self._channels[0])
        self.traffic = traffic_pb2_grpc.TrafficServiceStub(self._channels[0])
        self.routers = [inference_pb2_grpc.InferenceServiceStub(c) for c in self._channels[1:]]

    async def close(self) -> None:
        for c in self._channels:
            await c.close()

    async def deploy(self, name: str, replicas: int, options: dict[str, str] | None = None,
                     regions: dict[str, int] | None = None, wait: bool = True, backend: str = "sim") -> None:
        wanted = [cp.RegionRequirement(region=r, min_replicas=n) for r, n in (regions or {}).items()]
        spec = cp.ModelSpec(name=name, backend=backend, replicas=replicas, options=options or {}, regions=wanted)
        await self.cp.DeployModel(cp.DeployModelRequest(spec=spec), timeout=15)
        if wait:
            await self.wait_ready(name, replicas)

    async def wait_ready(self, name: str, replicas: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen = []
            for r in self.routers:
                models = (await r.ListModels(inference_pb2.ListModelsRequest(), timeout=5)).models
                seen.append(any(m.name == name and m.ready_replicas >= replicas for m in models))
            if all(seen):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"{name} not READY x{replicas} on every router within {timeout}s")

    async def set_policy(self, policy: tp.TrafficPolicy) -> tp.TrafficPolicy:
        return (await self.traffic.SetTrafficPolicy(tp.SetTrafficPolicyRequest(policy=policy), timeout=15)).policy

    async def policy(self, name: str) -> tp.TrafficPolicyStatus:
        resp = await self.traffic.ListTrafficPolicies(tp.ListTrafficPoliciesRequest(name=name), timeout=10)
        return resp.policies[0]

    async def ready_since_ms(self, model: str) -> dict[str, int]:
        """server -> when its replica of `model` became READY (the model server's own clock)."""
        resp = await self.cp.GetClusterStatus(cp.GetClusterStatusRequest(), timeout=15)
        return {s.info.server_id: m.since_ms for s in resp.servers for m in s.models
                if m.model == model and m.state == cp.MODEL_STATE_READY}

    async def routed(self, model: str, route_prefix: str, timeout: float = 20.0) -> None:
        """Until both routers send `model` along a route starting with `route_prefix`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            req = inference_pb2.GenerateRequest(model=model, prompt="probe")
            req.sampling.max_tokens = 1
            routes = []
            for r in self.routers:
                try:
                    routes.append((await r.Generate(req, timeout=10)).served_by.route)
                except grpc.aio.AioRpcError:
                    routes.append("")
            if all(x.startswith(route_prefix) for x in routes):
                return
            await asyncio.sleep(0.2)
        raise TimeoutError(f"routers did not route {model} along {route_prefix} within {timeout}s")


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
