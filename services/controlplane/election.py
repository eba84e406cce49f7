"""Leader election among control-plane replicas through one etcd key on the leader's lease.

Campaign: create the key only if absent. Hold: keep the lease alive; step down as soon as renewals
stop succeeding for most of the TTL (before etcd could hand leadership to someone else). The key's
value (this term's LeaderRecord) fences every write the leader makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace
from services.common.etcd_client import EtcdClient, create_if_absent
from services.common.lifecycle import now_ms
from services.common.tasks import stop_task

log = logging.getLogger(__name__)


class Election:
    def __init__(self, client: EtcdClient, replica_id: str, address: str, ttl: int = 5,
                 on_change: Callable[[bool], None] | None = None) -> None:
        self._client = client
        self.replica_id = replica_id
        self.address = address
        self.ttl = ttl
        self._on_change = on_change or (lambda leading: None)
        self.is_leader = False
        self.fence = b""
        self.terms = 0
        self._lease: int | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="election")

    async def stop(self) -> None:
        """Resign: revoking the lease deletes the key, so a follower takes over at once."""
        await stop_task(self._task)
        self._set(False)
        if self._lease is not None:
            with contextlib.suppress(Exception):  # best effort on the way out
                await asyncio.wait_for(self._client.revoke_lease(self._lease), 2.0)

    def _set(self, leading: bool) -> None:
        if leading != self.is_leader:
            self.is_leader = leading
            if leading:
                self.terms += 1
            log.info("%s %s leadership", self.replica_id, "took" if leading else "lost")
            self._on_change(leading)

    async def _run(self) -> None:
        while True:
            try:
                await self._campaign()
                if self.is_leader:
                    await self._hold()
                else:
                    await asyncio.sleep(min(0.5, self.ttl / 4))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - etcd trouble: follower until it is back
                self._set(False)
                log.warning("election: %s", exc)
                await asyncio.sleep(0.5)

    async def _campaign(self) -> None:
        if await self._client.get(keyspace.ELECTION) is not None:
            return
        self._lease = await self._client.grant_lease(self.ttl)
        record = cp.LeaderRecord(replica_id=self.replica_id, address=self.address,
                                 since_ms=now_ms())
        value = keyspace.encode(record)
        if await create_if_absent(self._client, keyspace.ELECTION, value, self._lease):
            self.fence = value
            self._set(True)
        else:
            await self._client.revoke_lease(self._lease)
            self._lease = None

    async def _hold(self) -> None:
        lease = self._lease
        last_ok = time.monotonic()
        while lease is not None:
            await asyncio.sleep(self.ttl / 4)
            try:
                ttl = await asyncio.wait_for(self._client.refresh_lease(lease), self.ttl / 4)
                if ttl <= 0:
                    break
                last_ok = time.monotonic()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                log.warning("leader lease renewal failed: %s", exc)
            if time.monotonic() - last_ok > self.ttl * 0.6:
                break
        log.warning("%s stepping down: leadership lease could not be renewed", self.replica_id)
        self._set(False)
        self._lease = None
