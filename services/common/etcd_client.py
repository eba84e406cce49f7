"""Thin asyncio access to etcd: connection to a member list, leases that re-register, and
prefix mirrors that survive reconnects.

Every process uses this one client library (aetcd). Key names never appear here; they live
in keyspace.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aetcd
import aetcd.exceptions
import aetcd.rpc

from services.common.tasks import stop_task

from . import grpc_util
from .etcd_tls import new_client as _new_client
from .tls import TlsFiles

log = logging.getLogger(__name__)

#: etcd refuses transactions with more operations than this (its --max-txn-ops is 128).
MAX_TXN_OPS = 100

#: Errors that mean "etcd is unreachable or the call failed"; callers retry, never crash.
EtcdError = (aetcd.exceptions.ClientError, asyncio.TimeoutError, OSError)


def parse_endpoints(spec: str | list[str]) -> list[str]:
    """'127.0.0.1:2379,127.0.0.1:22379' -> ['127.0.0.1:2379', '127.0.0.1:22379']."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out = [e.strip().removeprefix("http://").removeprefix("https://") for e in items if e.strip()]
    if not out:
        raise ValueError("at least one etcd endpoint is needed (host:port)")
    for e in out:
        host, _, port = e.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"etcd endpoint {e!r} is not host:port")
    return out


def _grpc_target(endpoints: list[str]) -> tuple[str, int]:
    """aetcd dials f'{host}:{port}'; a list of IP members becomes one gRPC ipv4: target so the
    channel fails over between members by itself."""
    if len(endpoints) == 1:
        host, _, port = endpoints[0].rpartition(":")
        return host, int(port)
    try:
        for e in endpoints:
            ipaddress.ip_address(e.rpartition(":")[0].strip("[]"))
    except ValueError:
        # Names cannot go into an ipv4: target; dial the first (a DNS name usually
        # resolves to every member anyway, e.g. a Kubernetes headless service).
        host, _, port = endpoints[0].rpartition(":")
        return host, int(port)
    *rest, last = endpoints
    host, _, port = last.rpartition(":")
    return "ipv4:" + ",".join(rest + [host]), int(port)


class EtcdClient:
    """One connection to an etcd cluster, shared by a process's components.

    `tls`: client certificate files; by default the process's own (grpc_util.configure_tls),
    None when it runs plaintext."""

    def __init__(self, endpoints: str | list[str], timeout: float = 3.0,
                 tls: TlsFiles | None | bool = True) -> None:
        self.endpoints = parse_endpoints(endpoints)
        self.tls = grpc_util.current_tls() if tls is True else (tls or None)
        host, port = _grpc_target(self.endpoints)
        self._client = _new_client(host, port, timeout,
                                   {"grpc.lb_policy_name": "round_robin",
                                    "grpc.initial_reconnect_backoff_ms": 200,
                                    "grpc.max_reconnect_backoff_ms": 2000}, self.tls)
        self.timeout = timeout

    async def connect(self) -> None:
        await self._client.connect()

    async def close(self) -> None:
        await self._client.close()

    @property
    def raw(self) -> aetcd.Client:
        return self._client

    async def get(self, key: str) -> bytes | None:
        result = await self._client.get(key.encode())
        return None if result is None else result.value

    async def read(self, key: str, timeout: float) -> tuple[bytes | None, int]:
        """A linearizable read (value, mod revision; (None, 0) when absent) that gives up after
        `timeout`. Linearizable reads go through the raft leader, so a member that lost quorum
        cannot answer one from its stale copy: answers about "now" (who leads, is the cluster
        healthy) use this, never a watch. Raises EtcdError (asyncio.TimeoutError included)."""
        result = await asyncio.wait_for(self._client.get(key.encode(), serializable=False), timeout)
        return (None, 0) if result is None else (result.value, result.mod_revision)

    async def get_prefix(self, prefix: str) -> tuple[dict[str, bytes], int]:
        """Values under prefix and the store revision they were read at."""
        result = await self._client.get_prefix(prefix.encode())
        return {kv.key.decode(): kv.value for kv in result.kvs}, result.header.revision

    async def put(self, key: str, value: bytes, lease: int | None = None) -> int:
        result = await self._client.put(key.encode(), value, lease=lease)
        return result.header.revision

    async def delete(self, key: str) -> bool:
        result = await self._client.delete(key.encode())
        return bool(result and result.deleted)

    async def delete_prefix(self, prefix: str) -> int:
        result = await self._client.delete_prefix(prefix.encode())
        return result.deleted if result else 0

    async def grant_lease(self, ttl: int) -> int:
        lease = await self._client.lease(ttl)
        return lease.id

    async def refresh_lease(self, lease_id: int) -> int:
        """Remaining TTL after the refresh; 0 means the lease is gone."""
        reply = await self._client.refresh_lease(lease_id)
        return int(reply.TTL) if reply is not None else 0

    async def revoke_lease(self, lease_id: int) -> None:
        await self._client.revoke_lease(lease_id)

    async def member_status(self) -> list[dict]:
        """Status of every configured endpoint, asked in parallel (for `meshctl status`)."""
        return list(await asyncio.gather(*(self._one_member(ep) for ep in self.endpoints)))

    async def _one_member(self, ep: str) -> dict:
        host, _, port = ep.rpartition(":")
        single = _new_client(host, int(port), min(self.timeout, 2.0), {}, self.tls)
        try:
            await single.connect()
            resp = await single.maintenancestub.Status(
                aetcd.rpc.StatusRequest(), timeout=min(self.timeout, 2.0))
            return {"endpoint": ep, "healthy": True, "version": resp.version,
                    "is_leader": resp.leader == resp.header.member_id, "error": ""}
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            return {"endpoint": ep, "healthy": False, "version": "", "is_leader": False,
                    "error": f"{type(exc).__name__}: {exc}".strip()}
        finally:
            with contextlib.suppress(Exception):
                await single.close()


@dataclass
class _Registration:
    key: str
    value: bytes


class LeaseKeeper:
    """Keeps a set of keys alive on one lease.

    A lost lease (expired while etcd or this process was unreachable) means: grant a new one and
    put every key again. It never raises out of its loop; `healthy` says whether the last
    keep-alive got through.
    """

    def __init__(self, client: EtcdClient, ttl: int = 10) -> None:
        self._client = client
        self.ttl = ttl
        self._keys: dict[str, _Registration] = {}
        self._pending_deletes: set[str] = set()
        self.lease_id: int | None = None
        self.healthy = False
        self.reregistrations = 0
        self._task: asyncio.Task | None = None
        self._wake = asyncio.Event()
        self._registered = asyncio.Event()  # set once the first registration got through

    async def put(self, key: str, value: bytes) -> None:
        """Attach key to the lease (now if possible, otherwise at the next successful renewal)."""
        self._keys[key] = _Registration(key, value)
        if self.lease_id is not None:
            try:
                await self._client.put(key, value, lease=self.lease_id)
            except EtcdError as exc:
                log.warning("etcd put %s failed, will retry on renewal: %s", key, exc)
                self._wake.set()

    async def delete(self, key: str) -> None:
        """Detach and delete a key (now if possible; a later re-registration will not restore it)."""
        self._keys.pop(key, None)
        try:
            await self._client.delete(key)
        except EtcdError as exc:
            log.warning("etcd delete %s failed, will retry: %s", key, exc)
            self._pending_deletes.add(key)
            self._wake.set()

    async def start(self, wait: float = 10.0) -> None:
        """Start keeping alive; waits up to `wait` seconds for the first registration."""
        self._task = asyncio.create_task(self._run(), name="lease-keeper")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._registered.wait(), wait)
        if not self.healthy:
            log.warning("etcd not reachable yet; registration continues in the background")

    async def stop(self, revoke: bool = True) -> None:
        await stop_task(self._task)
        if revoke and self.lease_id is not None:
            with contextlib.suppress(Exception):  # best effort on the way out
                await asyncio.wait_for(self._client.revoke_lease(self.lease_id), 2.0)

    async def _register(self) -> None:
        self.lease_id = await self._client.grant_lease(self.ttl)
        for reg in list(self._keys.values()):
            await self._client.put(reg.key, reg.value, lease=self.lease_id)

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            try:
                if self.lease_id is None:
                    await self._register()
                    log.info("registered %d key(s) on lease %x", len(self._keys), self.lease_id)
                elif await self._client.refresh_lease(self.lease_id) <= 0:
                    log.warning("lease %x expired; registering again", self.lease_id)
                    self.lease_id = None
                    self.reregistrations += 1
                    continue
                elif self._wake.is_set():
                    for reg in list(self._keys.values()):
                        await self._client.put(reg.key, reg.value, lease=self.lease_id)
                for key in list(self._pending_deletes):
                    if key not in self._keys:
                        await self._client.delete(key)
                    self._pending_deletes.discard(key)
                self._wake.clear()
                self.healthy = True
                self._registered.set()
                backoff = 0.2
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.ttl / 3)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd down must never crash the process
                self.healthy = False
                log.warning("etcd keep-alive failed (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 2.0)


Callback = Callable[[str, bytes | None], Awaitable[None] | None]


class PrefixMirror:
    """A local copy of everything under one prefix, kept current by a watch.

    The watch resumes from the last revision seen, so no event is lost across reconnects; after a
    compaction it reads the prefix again. While etcd is unreachable the copy keeps the last known
    state (the data plane keeps serving from it).
    """

    def __init__(self, client: EtcdClient, prefix: str, on_change: Callback | None = None) -> None:
        self._client = client
        self.prefix = prefix
        self.items: dict[str, bytes] = {}
        self.revision = 0
        self.synced = asyncio.Event()
        self.connected = False
        self._on_change = on_change
        self._task: asyncio.Task | None = None

    async def start(self, wait: float = 10.0) -> None:
        self._task = asyncio.create_task(self._run(), name=f"mirror:{self.prefix}")
        try:
            await asyncio.wait_for(self.synced.wait(), wait)
        except TimeoutError:
            log.warning("no etcd snapshot of %s yet; continuing with an empty view", self.prefix)

    async def stop(self) -> None:
        await stop_task(self._task)

    async def _notify(self, key: str, value: bytes | None) -> None:
        if self._on_change is not None:
            result = self._on_change(key, value)
            if asyncio.iscoroutine(result):
                await result

    async def _resync(self) -> None:
        items, revision = await self._client.get_prefix(self.prefix)
        old = self.items
        self.items = items
        self.revision = revision
        for key in old.keys() - items.keys():
            await self._notify(key, None)
        for key, value in items.items():
            if old.get(key) != value:
                await self._notify(key, value)
        self.synced.set()

    async def _run(self) -> None:
        backoff = 0.2
        need_resync = True
        while True:
            try:
                if need_resync:
                    await self._resync()
                    need_resync = False
                watch = await self._client.raw.watch_prefix(
                    self.prefix.encode(), start_revision=self.revision + 1)
                self.connected = True
                backoff = 0.2
                async for event in watch:
                    key = event.kv.key.decode()
                    self.revision = max(self.revision, event.kv.mod_revision)
                    if event.kind == "PUT":
                        self.items[key] = event.kv.value
                        await self._notify(key, event.kv.value)
                    elif self.items.pop(key, None) is not None:
                        await self._notify(key, None)
                # The iterator only ends when the stream broke; resume from self.revision.
            except asyncio.CancelledError:
                raise
            except aetcd.exceptions.RevisionCompactedError:
                log.info("watch on %s fell behind a compaction; reading it again", self.prefix)
                need_resync = True
            except Exception as exc:  # noqa: BLE001 - keep the last state and retry
                if self.connected:
                    log.warning("watch on %s broke (%s); keeping the last state", self.prefix, exc)
                self.connected = False
                await asyncio.sleep(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, 2.0)


async def create_if_absent(client: EtcdClient, key: str, value: bytes, lease: int) -> bool:
    """Atomically create key on lease unless it exists (the election's campaign step)."""
    raw = client.raw
    ok, _ = await raw.transaction(
        compare=[raw.transactions.create(key.encode()) == 0],
        success=[raw.transactions.put(key.encode(), value, lease=lease)], failure=[])
    return bool(ok)


async def fenced_write(client: EtcdClient, fence_key: str, fence_value: bytes,
                       puts: dict[str, bytes], deletes: list[str],
                       existing: tuple[str, ...] = ()) -> bool:
    """Apply puts and deletes only while fence_key still holds fence_value (our leadership term),
    so a deposed leader can never overwrite its successor's decisions. `existing`: keys that must
    still exist, so an update computed from a stale view cannot bring back a record an operator
    deleted meanwhile."""
    raw = client.raw
    ops = [raw.transactions.put(k.encode(), v) for k, v in puts.items()]
    ops += [raw.transactions.delete(k.encode()) for k in deletes]
    compare = [raw.transactions.value(fence_key.encode()) == fence_value]
    compare += [raw.transactions.create(k.encode()) > 0 for k in existing]
    for start in range(0, max(len(ops), 1), MAX_TXN_OPS):
        ok, _ = await raw.transaction(
            compare=compare, success=ops[start:start + MAX_TXN_OPS], failure=[])
        if not ok:
            return False
    return True


async def retrying(call: Callable[[], Awaitable], budget_s: float = 6.0):
    """Run an etcd call, retrying transient failures (a member down, a raft election) within a
    time budget, so one etcd member dying is invisible to operators' requests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget_s
    delay = 0.1
    while True:
        try:
            return await call()
        except EtcdError:
            if loop.time() + delay >= deadline:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
