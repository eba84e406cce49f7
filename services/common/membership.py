"""A live, read-only view of who is in the mesh, built from etcd watches.

Routers and the control plane both read membership through this view, so every replica sees the
same state for the same etcd revision. When etcd is unreachable the view keeps the last state.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Callable

from meshserve.v1 import controlplane_pb2, modelserver_pb2

from . import keyspace
from .etcd_client import EtcdClient, PrefixMirror

log = logging.getLogger(__name__)


class MeshView:
    def __init__(self, client: EtcdClient) -> None:
        self._client = client
        self.servers: dict[str, modelserver_pb2.ServerInfo] = {}
        self.drains: dict[str, controlplane_pb2.DrainRecord] = {}
        self.routers: dict[str, controlplane_pb2.ReplicaInfo] = {}
        self.controlplanes: dict[str, controlplane_pb2.ReplicaInfo] = {}
        self._listeners: list[Callable[[], None]] = []
        self._mirrors = [
            PrefixMirror(client, keyspace.SERVERS, self._apply(self.servers, keyspace.SERVERS)),
            PrefixMirror(client, keyspace.DRAIN, self._apply(self.drains, keyspace.DRAIN)),
            PrefixMirror(client, keyspace.ROUTERS, self._apply(self.routers, keyspace.ROUTERS)),
            PrefixMirror(client, keyspace.CONTROLPLANES,
                         self._apply(self.controlplanes, keyspace.CONTROLPLANES)),
        ]

    def _apply(self, table: dict, prefix: str):
        cls = keyspace.VALUE_TYPES[prefix]

        def on_change(key: str, value: bytes | None) -> None:
            ident = keyspace.id_from_key(prefix, key)
            if value is None:
                table.pop(ident, None)
            else:
                msg = keyspace.decode(cls, value)
                if msg is None:
                    log.error("skipping corrupt value at %s", key)
                    return
                table[ident] = msg
            for listener in self._listeners:
                listener()
        return on_change

    def subscribe(self, listener: Callable[[], None]) -> None:
        """Called (synchronously, on the event loop) after every change."""
        self._listeners.append(listener)

    async def start(self, wait: float = 10.0) -> None:
        await asyncio.gather(*(m.start(wait) for m in self._mirrors))

    async def stop(self) -> None:
        await asyncio.gather(*(m.stop() for m in self._mirrors))

    @property
    def connected(self) -> bool:
        return all(m.connected for m in self._mirrors)

    def is_draining(self, server_id: str) -> bool:
        return server_id in self.drains

    def servers_for(self, model: str) -> list[modelserver_pb2.ServerInfo]:
        """Servers that carry the model and are not draining."""
        return [s for sid, s in self.servers.items()
                if model in s.models and sid not in self.drains]

    def models(self) -> dict[str, list[modelserver_pb2.ServerInfo]]:
        out: dict[str, list[modelserver_pb2.ServerInfo]] = {}
        for sid, s in self.servers.items():
            if sid in self.drains:
                continue
            for m in s.models:
                out.setdefault(m, []).append(s)
        return out
