"""Tenants, API keys and the audit log in etcd: the plain-Python core behind AuthService."""

from __future__ import annotations

import asyncio
import logging
import secrets

from meshserve.v1 import auth_pb2

from services.common import auth_records, keyspace
from services.common.errors import AlreadyExists, NotFound
from services.common.etcd_client import EtcdClient, create_if_absent
from services.common.lifecycle import now_ms

log = logging.getLogger(__name__)

MAX_AUDIT_LIST = 1000


class AuthOps:
    def __init__(self, etcd: EtcdClient) -> None:
        self._etcd = etcd

    async def create_tenant(self, tenant: auth_pb2.Tenant, replace: bool = False) -> None:
        record = auth_pb2.Tenant()
        record.CopyFrom(auth_records.check_tenant(tenant))
        record.created_unix_ms = now_ms()
        if replace:
            await self._etcd.put(keyspace.tenant_key(record.name), keyspace.encode(record))
        elif not await create_if_absent(self._etcd, keyspace.tenant_key(record.name),
                                      keyspace.encode(record), lease=0):
            raise AlreadyExists(f"tenant {record.name} exists; delete it first to change it")

    async def tenants(self) -> list[auth_pb2.Tenant]:
        values, _ = await self._etcd.get_prefix(keyspace.TENANTS)
        found = (keyspace.decode(auth_pb2.Tenant, v) for v in values.values())
        return sorted((t for t in found if t is not None), key=lambda t: t.name)

    async def delete_tenant(self, name: str) -> None:
        """The tenant and its keys (revoked first, so no key outlives its tenant)."""
        key = keyspace.tenant_key(name)
        if await self._etcd.get(key) is None:
            raise NotFound(f"no tenant {name}; `meshctl tenants list` shows them")
        for record in await self.keys(name):
            await self.revoke_key(record.key_id)
        await self._etcd.delete(key)

    async def create_key(self, tenant: str, created_by: str) -> tuple[str, str]:
        if await self._etcd.get(keyspace.tenant_key(tenant)) is None:
            raise NotFound(f"no tenant {tenant}; create it with `meshctl tenants create`")
        record, whole = auth_records.new_key(tenant, created_by, now_ms())
        await self._etcd.put(keyspace.api_key_key(record.key_id), keyspace.encode(record))
        return record.key_id, whole

    async def keys(self, tenant: str = "") -> list[auth_pb2.ApiKey]:
        values, _ = await self._etcd.get_prefix(keyspace.API_KEYS)
        out = []
        for value in values.values():
            record = keyspace.decode(auth_pb2.ApiKey, value)
            if record is not None and (not tenant or record.tenant == tenant):
                record.ClearField("secret_sha256")
                out.append(record)
        return sorted(out, key=lambda k: (k.tenant, k.created_unix_ms))

    async def revoke_key(self, key_id: str) -> None:
        key = keyspace.api_key_key(key_id)
        value = await self._etcd.get(key)
        record = keyspace.decode(auth_pb2.ApiKey, value) if value is not None else None
        if record is None:
            raise NotFound(f"no API key {key_id}; `meshctl keys list` shows them")
        record.revoked = True
        await self._etcd.put(key, keyspace.encode(record))

    async def audit(self, event: auth_pb2.AuditEvent) -> None:
        """Record one operator action; a failure is logged loudly (the action already happened)."""
        key = keyspace.audit_key(event.time_unix_ms, secrets.token_hex(4))
        try:
            await asyncio.wait_for(self._etcd.put(key, keyspace.encode(event)), 5.0)
        except Exception:  # noqa: BLE001 - etcd down: the log keeps the record instead
            log.error("AUDIT (not stored in etcd): %s %s by %s -> %s", event.action, event.detail,
                      event.who, event.outcome)

    async def audit_events(self, limit: int) -> list[auth_pb2.AuditEvent]:
        values, _ = await self._etcd.get_prefix(keyspace.AUDIT)
        newest = sorted(values, reverse=True)[:max(1, min(limit or 100, MAX_AUDIT_LIST))]
        events = (keyspace.decode(auth_pb2.AuditEvent, values[k]) for k in newest)
        return [e for e in events if e is not None]
