"""Connections to model servers, kept in step with membership, plus what the router knows of
each server's load (its own outstanding count and the server's streamed load reports)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import grpc
from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

from services.common.grpc_util import CHANNEL_OPTIONS
from services.common.membership import MeshView

log = logging.getLogger(__name__)

EJECT_AFTER_FAILURES = 3
EJECT_SECONDS = 5.0


@dataclass
class Backend:
    """One model server as this router sees it."""

    info: modelserver_pb2.ServerInfo
    channel: grpc.aio.Channel
    stub: modelserver_pb2_grpc.ModelServerServiceStub
    outstanding: int = 0
    report: modelserver_pb2.LoadReport | None = None
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    load_task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def server_id(self) -> str:
        return self.info.server_id

    def ejected(self, now: float) -> bool:
        return now < self.ejected_until

    def record_success(self) -> None:
        self.consecutive_failures = 0

    def record_failure(self) -> None:
        """Outlier detection: a server that keeps failing is skipped for a while."""
        self.consecutive_failures += 1
        if self.consecutive_failures >= EJECT_AFTER_FAILURES:
            self.ejected_until = time.monotonic() + EJECT_SECONDS
            log.warning("ejecting %s for %.0fs after %d failures", self.server_id, EJECT_SECONDS,
                        self.consecutive_failures)


class BackendPool:
    """Keeps one channel per live server; a server whose lease is gone is dropped at once."""

    def __init__(self, view: MeshView, load_interval_ms: int = 200) -> None:
        self._view = view
        self._load_interval_ms = load_interval_ms
        self.backends: dict[str, Backend] = {}
        self._closing: set[asyncio.Task] = set()
        view.subscribe(self.sync)

    def sync(self) -> None:
        """Reconcile channels with membership (called on every etcd change)."""
        live = self._view.servers
        for sid in list(self.backends):
            info = live.get(sid)
            if info is None or info.address != self.backends[sid].info.address:
                self._drop(sid)
        for sid, info in live.items():
            if sid in self.backends:
                self.backends[sid].info = info
                continue
            channel = grpc.aio.insecure_channel(info.address, options=CHANNEL_OPTIONS)
            backend = Backend(info=info, channel=channel,
                              stub=modelserver_pb2_grpc.ModelServerServiceStub(channel))
            backend.load_task = asyncio.get_running_loop().create_task(self._follow_load(backend))
            self.backends[sid] = backend
            log.info("backend %s at %s joined (%s)", sid, info.address, ", ".join(info.models))

    def _drop(self, sid: str) -> None:
        backend = self.backends.pop(sid)
        log.info("backend %s left", sid)
        if backend.load_task:
            backend.load_task.cancel()
        # Requests already streaming on the channel may finish; close it gracefully.
        task = asyncio.get_running_loop().create_task(backend.channel.close(grace=30.0))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _follow_load(self, backend: Backend) -> None:
        """Subscribe to the server's load reports; reconnect while it stays a member."""
        while True:
            try:
                call = backend.stub.StreamLoad(
                    modelserver_pb2.StreamLoadRequest(interval_ms=self._load_interval_ms))
                async for msg in call:
                    backend.report = msg.report
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError:
                backend.report = None
            await asyncio.sleep(0.5)

    def known_models(self) -> set[str]:
        return self._view.known_models()

    def candidates(self, model: str) -> list[Backend]:
        """Servers with the model READY, verdict SERVING, not draining."""
        return [self.backends[s.server_id] for s in self._view.servers_for(model)
                if s.server_id in self.backends]

    async def close(self) -> None:
        for sid in list(self.backends):
            self._drop(sid)
        if self._closing:
            await asyncio.wait(self._closing, timeout=2.0)
