"""One-shot calls the control plane makes to model servers: health, a one-token probe, load.

Each call has its own deadline, so a hung server (accepts connections, never answers) shows up as
a failure instead of a wait.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve.v1 import common_pb2, modelserver_pb2, modelserver_pb2_grpc

from services.common.grpc_util import aio_channel


class ServerProbe:
    """Channels to model servers, reused across checks and dropped when a server leaves."""

    def __init__(self) -> None:
        self._channels: dict[str, tuple[str, grpc.aio.Channel]] = {}
        # Channel closes run in the background; kept here so none is garbage-collected midway
        # and close() can wait for them.
        self._closing: set[asyncio.Task] = set()

    def _close_later(self, channel: grpc.aio.Channel) -> None:
        task = asyncio.get_running_loop().create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _channel(self, server_id: str, address: str) -> grpc.aio.Channel:
        known = self._channels.get(server_id)
        if known is None or known[0] != address:
            if known is not None:
                self._close_later(known[1])
            known = (address, aio_channel(address))
            self._channels[server_id] = known
        return known[1]

    def forget(self, keep: set[str]) -> None:
        for sid in list(self._channels):
            if sid not in keep:
                _, channel = self._channels.pop(sid)
                self._close_later(channel)

    async def close(self) -> None:
        for _, channel in self._channels.values():
            await channel.close()
        self._channels.clear()
        await asyncio.gather(*self._closing, return_exceptions=True)

    async def health(self, server_id: str, address: str, service: str, timeout: float) -> str:
        """'' when SERVING, else what was wrong."""
        stub = health_pb2_grpc.HealthStub(self._channel(server_id, address))
        try:
            resp = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            return f"health check {service or '(server)'}: {exc.code().name}"
        if resp.status != health_pb2.HealthCheckResponse.SERVING:
            return f"health check {service or '(server)'}: " \
                   f"{health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}"
        return ""

    async def generate_one_token(self, server_id: str, address: str, model: str,
                                 timeout: float) -> str:
        """A CRITICAL-priority one-token generation: it goes ahead of queued work, so only a
        wedged engine (not a busy one) fails it. '' when it answered."""
        stub = modelserver_pb2_grpc.ModelServerServiceStub(self._channel(server_id, address))
        req = modelserver_pb2.ModelServerServiceGenerateRequest(
            request_id=f"health-probe-{server_id}", model=model, prompt="ping",
            priority=common_pb2.PRIORITY_CRITICAL)
        req.sampling.max_tokens = 1
        try:
            async for part in stub.Generate(req, timeout=timeout):
                if part.token_ids or part.finish_reason:
                    return ""
            return ""
        except grpc.aio.AioRpcError as exc:
            return f"generation probe on {model}: {exc.code().name}"

    async def load(self, server_id: str, address: str,
                   timeout: float) -> modelserver_pb2.LoadReport | None:
        stub = modelserver_pb2_grpc.ModelServerServiceStub(self._channel(server_id, address))
        call = stub.StreamLoad(modelserver_pb2.StreamLoadRequest(), timeout=timeout)
        try:
            async for msg in call:
                return msg.report
        except grpc.aio.AioRpcError:
            return None
        finally:
            call.cancel()
        return None
