"""Connections to model servers, kept in step with membership, plus what the router knows of
each server's load (its own outstanding count and the server's streamed load reports)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

from services.common.grpc_util import CHANNEL_OPTIONS
from services.common.membership import MeshView

from .policy.types import Load

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
    outstanding_at_report: int = 0
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    load_task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def server_id(self) -> str:
        return self.info.server_id

    @property
    def region(self) -> str:
        return self.info.region

    @property
    def zone(self) -> str:
        return self.info.zone

    def set_report(self, report: modelserver_pb2.LoadReport | None) -> None:
        self.report = report
        self.outstanding_at_report = self.outstanding

    def load(self) -> Load:
        """The server's report plus what this router sent since (reports lag by up to an
        interval; a burst must not all land on the server that looked idle), and never less
        than this router's own outstanding requests."""
        r = self.report
        if r is None:
            return Load(in_flight=self.outstanding)
        reported = r.running + r.queue_depth
        since = max(0, self.outstanding - self.outstanding_at_report)
        return Load(in_flight=max(reported + since, self.outstanding), queue_depth=r.queue_depth,
                    max_running=r.max_running, kv_blocks_used=r.kv_blocks_used,
                    kv_blocks_total=r.kv_blocks_total)

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

    def __init__(self, view: MeshView, load_interval_ms: int = 100) -> None:
        self._view = view
        self._load_interval_ms = load_interval_ms
        self.backends: dict[str, Backend] = {}
        self._closing: set[asyncio.Task] = set()
        self._on_change: list[Callable[[], None]] = []
        self._on_leave: list[Callable[[str], None]] = []
        # Per-request lookups, rebuilt only after membership changes (every change calls sync).
        self._candidates: dict[str, list[Backend]] = {}
        self._known: frozenset[str] | None = None
        view.subscribe(self.sync)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Called after membership changes and after every load report (admission re-checks)."""
        self._on_change.append(listener)

    def on_leave(self, listener: Callable[[str], None]) -> None:
        """Called with the server id when a server leaves (the policy forgets its cache)."""
        self._on_leave.append(listener)

    def _changed(self) -> None:
        for listener in self._on_change:
            listener()

    @property
    def policy_record(self):
        """The RoutingPolicy record in etcd, or None."""
        return self._view.routing_policy

    def _invalidate(self) -> None:
        self._candidates.clear()
        self._known = None

    def sync(self) -> None:
        """Reconcile channels with membership (called on every etcd change)."""
        self._invalidate()
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
        self._invalidate()
        self._changed()

    def _drop(self, sid: str) -> None:
        backend = self.backends.pop(sid)
        self._invalidate()
        log.info("backend %s left", sid)
        for listener in self._on_leave:
            listener(sid)
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
                    backend.set_report(msg.report)
                    self._changed()
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError:
                backend.set_report(None)
            await asyncio.sleep(0.5)

    def known_models(self) -> frozenset[str]:
        if self._known is None:
            self._known = frozenset(self._view.known_models())
        return self._known

    def candidates(self, model: str) -> list[Backend]:
        """Servers with the model READY, verdict SERVING, not draining. The list is shared until
        membership changes: callers must not modify it."""
        found = self._candidates.get(model)
        if found is None:
            found = self._candidates[model] = [
                self.backends[s.server_id] for s in self._view.servers_for(model)
                if s.server_id in self.backends]
        return found

    async def close(self) -> None:
        for sid in list(self.backends):
            self._drop(sid)
        if self._closing:
            await asyncio.wait(self._closing, timeout=2.0)
