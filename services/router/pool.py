"""Links to model servers and their replicas, kept in step with membership, plus liveness.

Membership comes from the MeshView (etcd): a server's record makes a link (one channel, one load
stream); each model READY on it makes a replica. Liveness comes from the load stream: servers
report at least every second, so a link silent for `hang_timeout_s` is hung - its attempts in
flight are abandoned (they migrate) and its replicas are skipped until it reports again. A server
that leaves (lease gone) or is marked NOT_SERVING has its attempts abandoned at once as well; a
draining one keeps them (they finish there).

Lingering: a server whose membership record vanishes while its load stream keeps reporting is
alive - its lease expired while etcd was unreachable or without quorum, and it is registering
again. Its link and replicas stay usable for up to `linger_s` (or until it goes silent), so an
etcd outage longer than a lease never empties the mesh under its clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import modelserver_pb2, modelserver_pb2_grpc

from services.common.grpc_util import aio_channel
from services.common.membership import MeshView

from .replica import Replica, ServerLink

log = logging.getLogger(__name__)

KvListener = Callable[[str, modelserver_pb2.KvEvents,
                       Callable[[], Awaitable[modelserver_pb2.GetTokenizerResponse]]], bool]

DEFAULT_HANG_TIMEOUT_S = 3.0
DEFAULT_LINGER_S = 30.0


class BackendPool:
    def __init__(self, view: MeshView, load_interval_ms: int = 100,
                 hang_timeout_s: float = DEFAULT_HANG_TIMEOUT_S, linger_s: float = DEFAULT_LINGER_S) -> None:
        self._view = view
        self._load_interval_ms = load_interval_ms
        self.hang_timeout_s = hang_timeout_s
        self.linger_s = linger_s
        self.links: dict[str, ServerLink] = {}
        self._not_serving: set[str] = set()
        self._tasks: set[asyncio.Task] = set()
        self._on_change: list[Callable[[], None]] = []
        self._on_leave: list[Callable[[str], None]] = []
        self._on_kv: list[KvListener] = []
        # Per-request lookups, rebuilt only after membership changes (every change calls sync).
        self._candidates: dict[str, list[Replica]] = {}
        self._known: frozenset[str] | None = None
        self._watchdog: asyncio.Task | None = None
        view.subscribe(self.sync)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Called after membership changes and after every load report (admission re-checks)."""
        self._on_change.append(listener)

    def on_leave(self, listener: Callable[[str], None]) -> None:
        """Called with the replica id when a replica leaves (the policy forgets its record)."""
        self._on_leave.append(listener)

    def on_kv_events(self, listener: KvListener) -> None:
        """Called with (replica id, KvEvents, a tokenizer fetch) for each model's KV events on a load
        stream; a listener returning False (it missed events) makes the stream reopen (a snapshot)."""
        self._on_kv.append(listener)

    def _kv_events(self, link: ServerLink, report: modelserver_pb2.LoadReport) -> bool:
        ok = True
        for msg in report.kv_events:
            def fetch(model: str = msg.model) -> Awaitable[modelserver_pb2.GetTokenizerResponse]:
                return link.stub.GetTokenizer(modelserver_pb2.GetTokenizerRequest(model=model), timeout=30.0)
            for listener in self._on_kv:
                ok = listener(f"{link.server_id}/{msg.model}", msg, fetch) and ok
        return ok

    def _changed(self) -> None:
        for listener in self._on_change:
            listener()

    @property
    def policy_record(self) -> cp.RoutingPolicy | None:
        """The RoutingPolicy record in etcd, or None."""
        return self._view.routing_policy

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- membership ---------------------------------------------------------------------------

    def sync(self) -> None:
        """Reconcile links and replicas with the view (called on every etcd change)."""
        if self._watchdog is None:
            self._watchdog = self._spawn(self._watch_hangs(), "hang-watchdog")
        live = self._view.servers
        now = time.monotonic()
        for sid in list(self.links):
            info, link = live.get(sid), self.links[sid]
            if info is None:
                self._orphan_or_drop(link, now)
            elif info.address != link.info.address or info.started_at_ms != link.info.started_at_ms:
                self._drop(sid, "restarted" if info.address == link.info.address else "moved to a new address")
        for sid, info in live.items():
            link = self.links.get(sid) or self._connect(info)
            if link.orphaned_since is not None:
                log.info("server %s registered again after %.1fs", sid, now - link.orphaned_since)
                link.orphaned_since = None
            link.info = info
            self._check_verdict(link)
        self._sync_replicas()
        self._candidates.clear()
        self._known = None
        self._changed()

    def _connect(self, info: modelserver_pb2.ServerInfo) -> ServerLink:
        channel = aio_channel(info.address)
        link = ServerLink(info=info, channel=channel, stub=modelserver_pb2_grpc.ModelServerServiceStub(channel))
        link.load_task = self._spawn(self._follow_load(link), f"load:{info.server_id}")
        self.links[info.server_id] = link
        log.info("server %s at %s joined", info.server_id, info.address)
        return link

    def _orphan_or_drop(self, link: ServerLink, now: float) -> None:
        """Its membership record is gone: drop it, unless it is evidently alive (lingering)."""
        if link.orphaned_since is not None:
            return
        if link.reporting(now, self.hang_timeout_s):
            link.orphaned_since = now
            log.warning("server %s left membership but still reports: keeping it for up to %.0fs while it "
                        "registers again", link.server_id, self.linger_s)
        else:
            self._drop(link.server_id, "left the mesh")

    def _check_verdict(self, link: ServerLink) -> None:
        sid = link.server_id
        bad = self._view.verdict(sid) == cp.SERVING_STATE_NOT_SERVING
        if bad and sid not in self._not_serving:
            n = link.abort_attempts("its server was marked NOT_SERVING")
            if n:
                log.warning("server %s marked NOT_SERVING: moving %d attempt(s) elsewhere", sid, n)
        (self._not_serving.add if bad else self._not_serving.discard)(sid)

    def _sync_replicas(self) -> None:
        wanted: dict[str, dict[str, cp.ModelStatus]] = {}
        for (sid, model), status in self._view.statuses.items():
            if status.state == cp.MODEL_STATE_READY and sid in self.links:
                wanted.setdefault(sid, {})[model] = status
        for sid, link in self.links.items():
            if link.orphaned_since is not None:
                continue  # its statuses went with its lease: keep the last known replicas
            statuses = wanted.get(sid, {})
            for model in list(link.replicas):
                if model not in statuses:
                    self._forget(link.replicas.pop(model))
            for model, status in statuses.items():
                replica = link.replicas.get(model) or link.replicas.setdefault(model, Replica(link, model))
                replica.backend, replica.simulated = status.backend, status.simulated

    def _forget(self, replica: Replica) -> None:
        for listener in self._on_leave:
            listener(replica.replica_id)

    def _drop(self, sid: str, why: str) -> None:
        link = self.links.pop(sid)
        self._not_serving.discard(sid)
        n = link.abort_attempts(f"its server {why}")
        log.info("server %s %s%s", sid, why, f"; moving {n} attempt(s) elsewhere" if n else "")
        for replica in link.replicas.values():
            self._forget(replica)
        if link.load_task is not None:
            link.load_task.cancel()
        self._spawn(link.channel.close(grace=1.0), f"close:{sid}")

    # --- liveness -----------------------------------------------------------------------------

    async def _follow_load(self, link: ServerLink) -> None:
        """Subscribe to the server's load reports; reconnect while it stays a member."""
        while True:
            try:
                call = link.stub.StreamLoad(modelserver_pb2.StreamLoadRequest(interval_ms=self._load_interval_ms))
                async for msg in call:
                    link.on_report(msg.report, time.monotonic())
                    self._changed()
                    if msg.report.kv_events and not self._kv_events(link, msg.report):
                        call.cancel()  # reopened below: the server starts a new stream with a snapshot
                        break
            except grpc.aio.AioRpcError:
                link.lost_reports()
            await asyncio.sleep(0.2)

    async def _watch_hangs(self) -> None:
        tick = max(0.05, self.hang_timeout_s / 6)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            lagged, last = now - last > max(0.5, self.hang_timeout_s / 2), now
            if lagged:
                continue  # this router's own loop stalled; reports may be queued: judge next time
            self._expire_orphans(now)
            for link in self.links.values():
                silent = now - link.last_report_at
                if not link.hung and silent > self.hang_timeout_s:
                    link.hung = True
                    n = link.abort_attempts(f"its server sent no load report for {silent:.1f}s (hung)")
                    log.warning("server %s silent for %.1fs: treated as hung%s", link.server_id, silent,
                                f", moving {n} attempt(s) elsewhere" if n else "")

    def _expire_orphans(self, now: float) -> None:
        expired = [link for link in self.links.values() if link.orphaned_since is not None
                   and (now - link.orphaned_since > self.linger_s or not link.reporting(now, self.hang_timeout_s))]
        for link in expired:
            self._drop(link.server_id, "left the mesh (not registered again)")
        if expired:
            self._candidates.clear()
            self._known = None
            self._changed()

    # --- lookups (the request path) -----------------------------------------------------------

    def known_models(self) -> frozenset[str]:
        if self._known is None:
            lingering = {m for link in self.links.values() if link.orphaned_since is not None for m in link.replicas}
            self._known = frozenset(self._view.known_models()) | lingering
        return self._known

    def scales_from_zero(self, model: str) -> bool:
        """A deployed model whose autoscale policy lets it go to zero replicas: its requests wait
        for the control plane to place one instead of failing."""
        policy = self._view.autoscale_policies.get(model)
        return (model in self._view.models and policy is not None and policy.model == model
                and policy.enabled and policy.scale_to_zero)

    def _usable(self, sid: str, link: ServerLink) -> bool:
        if link.orphaned_since is None:
            return self._view.serving(sid)
        return not self._view.is_draining(sid) and self._view.verdict(sid) != cp.SERVING_STATE_NOT_SERVING

    def candidates(self, model: str) -> list[Replica]:
        """Replicas of the model READY on servers with verdict SERVING and no drain (hung and
        ejected ones included: the policy skips them unless nothing else is left). The list is
        shared until membership changes: callers must not modify it."""
        found = self._candidates.get(model)
        if found is None:
            found = self._candidates[model] = [
                link.replicas[model] for sid, link in sorted(self.links.items())
                if model in link.replicas and self._usable(sid, link)]
        return found

    async def close(self) -> None:
        for sid in list(self.links):
            self._drop(sid, "closed")
        if self._watchdog is not None:
            self._watchdog.cancel()
        pending = [t for t in self._tasks if not t.done()]
        if pending:
            for t in pending:
                if t.get_name().startswith(("load:", "hang-")):
                    t.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait(pending, timeout=2.0)
