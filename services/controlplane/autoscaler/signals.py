"""The leader's live inputs: every model server's load reports and every router's demand.

Servers: one StreamLoad subscription per member (they report at least every second, per model:
running, queued, max running, KV blocks, tokens/s). Routers: GetRouterLoad each tick (queue depth
and requests waiting for a first replica per model, requests in flight, a request counter, TTFT
p95). Both are pulled over gRPC by the leader alone, so neither the request path nor the signals
ever write to etcd; followers hold no subscriptions. A source that stops answering drops out after
`stale_s`, never counted as idle forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc, routerload_pb2, routerload_pb2_grpc

from services.common.grpc_util import CHANNEL_OPTIONS
from services.common.membership import MeshView

log = logging.getLogger(__name__)

STALE_S = 3.0


@dataclass
class Demand:
    """One model's demand summed over the routers that answered."""

    queued: int = 0
    waiting_for_replica: int = 0
    in_flight: int = 0
    ttft_p95_ms: float = 0.0  # the highest of the routers with samples
    ttft_samples: int = 0


@dataclass
class Snapshot:
    loads: dict[str, modelserver_pb2.LoadReport] = field(default_factory=dict)  # server -> report
    demand: dict[str, Demand] = field(default_factory=dict)  # model -> demand
    arrivals: dict[str, int] = field(default_factory=dict)  # model -> requests since last take
    routers: int = 0  # routers that answered recently


@dataclass
class _Source:
    address: str
    channel: grpc.aio.Channel
    task: asyncio.Task | None = None
    at: float = 0.0
    report: object = None


class SignalFeed:
    def __init__(self, view: MeshView, interval_s: float = 1.0, stale_s: float = STALE_S) -> None:
        self._view = view
        self.interval_s = interval_s
        self.stale_s = stale_s
        self._servers: dict[str, _Source] = {}
        self._routers: dict[str, _Source] = {}
        self._counters: dict[tuple[str, str], int] = {}  # (router, model) -> requests_total
        self._arrivals: dict[str, int] = {}
        self.on_waiting: Callable[[], None] = lambda: None
        self._closing: set[asyncio.Task] = set()  # channel closes in flight

    async def run(self, leading: Callable[[], bool]) -> None:
        try:
            while True:
                if leading():
                    self._sync()
                    await self._poll_routers()
                else:
                    await self._drop_all()
                await asyncio.sleep(self.interval_s)
        finally:
            await self._drop_all()

    # --- servers ------------------------------------------------------------------------------

    def _sync(self) -> None:
        members = {sid: info.address for sid, info in self._view.servers.items()}
        for sid in list(self._servers):
            if members.get(sid) != self._servers[sid].address:
                self._close(self._servers.pop(sid))
        for sid, address in members.items():
            if sid not in self._servers:
                src = _Source(address, grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS))
                src.task = asyncio.get_running_loop().create_task(self._follow(src),
                                                                  name=f"autoscale-load:{sid}")
                self._servers[sid] = src
        routers = {rid: r.address for rid, r in self._view.routers.items()}
        for rid in list(self._routers):
            if routers.get(rid) != self._routers[rid].address:
                self._close(self._routers.pop(rid))
        for rid, address in routers.items():
            if rid not in self._routers:
                self._routers[rid] = _Source(address, grpc.aio.insecure_channel(
                    address, options=CHANNEL_OPTIONS))

    async def _follow(self, src: _Source) -> None:
        stub = modelserver_pb2_grpc.ModelServerServiceStub(src.channel)
        while True:
            try:
                async for msg in stub.StreamLoad(modelserver_pb2.StreamLoadRequest(interval_ms=500)):
                    src.report, src.at = msg.report, time.monotonic()
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.5)

    # --- routers ------------------------------------------------------------------------------

    async def _poll_routers(self) -> None:
        items = list(self._routers.items())
        answers = await asyncio.gather(*(self._ask(src) for _, src in items))
        now = time.monotonic()
        waiting = False
        for (rid, src), answer in zip(items, answers, strict=True):
            if answer is None:
                continue
            src.report, src.at = answer, now
            for m in answer.models:
                self._count(rid, m.model, m.requests_total)
                waiting = waiting or m.waiting_for_replica > 0
        if waiting:
            self.on_waiting()

    async def _ask(self, src: _Source) -> routerload_pb2.GetRouterLoadResponse | None:
        stub = routerload_pb2_grpc.RouterLoadServiceStub(src.channel)
        try:
            return await stub.GetRouterLoad(routerload_pb2.GetRouterLoadRequest(),
                                            timeout=max(0.2, self.interval_s * 0.8))
        except grpc.aio.AioRpcError:
            return None

    def _count(self, router: str, model: str, total: int) -> None:
        """Arrivals from a counter: the difference since the last answer; a counter that went
        back means the router restarted (all of it is new); a router seen first is a baseline."""
        last = self._counters.get((router, model))
        self._counters[(router, model)] = total
        if last is None:
            return
        self._arrivals[model] = self._arrivals.get(model, 0) + (total - last if total >= last else total)

    # --- reading ------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """The fresh figures; arrivals counted since the previous snapshot."""
        now = time.monotonic()
        out = Snapshot(arrivals=self._arrivals)
        self._arrivals = {}
        for sid, src in self._servers.items():
            if src.report is not None and now - src.at <= self.stale_s:
                out.loads[sid] = src.report  # type: ignore[assignment]
        for src in self._routers.values():
            if src.report is None or now - src.at > self.stale_s:
                continue
            out.routers += 1
            for m in src.report.models:  # type: ignore[attr-defined]
                d = out.demand.setdefault(m.model, Demand())
                d.queued += m.queued
                d.waiting_for_replica += m.waiting_for_replica
                d.in_flight += m.in_flight
                if m.ttft_samples:
                    d.ttft_p95_ms = max(d.ttft_p95_ms, m.ttft_p95_ms)
                    d.ttft_samples += m.ttft_samples
        return out

    # --- teardown -----------------------------------------------------------------------------

    def _close(self, src: _Source) -> None:
        if src.task is not None:
            src.task.cancel()
        task = asyncio.get_running_loop().create_task(src.channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def _drop_all(self) -> None:
        sources = [*self._servers.values(), *self._routers.values()]
        self._servers.clear()
        self._routers.clear()
        self._counters.clear()
        self._arrivals = {}
        for src in sources:
            if src.task is not None:
                src.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await src.task
            with contextlib.suppress(Exception):
                await src.channel.close()
