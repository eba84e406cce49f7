"""aetcd over mTLS: aetcd dials plaintext only, so this connects the same stubs over a channel
made by grpc_util with the process's certificate (whose CN etcd takes as the user name when its
auth is on)."""

from __future__ import annotations

import asyncio
from typing import Any

import aetcd
import aetcd.rpc
import aetcd.watcher

from . import grpc_util
from .tls import TlsFiles


class _TlsClient(aetcd.Client):
    """An aetcd client whose channel is mTLS."""

    def __init__(self, *, tls: TlsFiles, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._tls = tls

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        if self._is_connecting:  # type: ignore[has-type]
            await asyncio.wait_for(self._connected.wait(), self._connect_wait_timeout)
            return
        try:
            self._is_connecting = True
            options = list(self._options.items())
            self.channel = grpc_util.aio_channel(f"{self._host}:{self._port}", options, self._tls)
            self.kvstub = aetcd.rpc.KVStub(self.channel)
            self.clusterstub = aetcd.rpc.ClusterStub(self.channel)
            self.leasestub = aetcd.rpc.LeaseStub(self.channel)
            self.maintenancestub = aetcd.rpc.MaintenanceStub(self.channel)
            self._watcher = aetcd.watcher.Watcher(aetcd.rpc.WatchStub(self.channel),
                                                  timeout=self._timeout, metadata=self.metadata)
            self._connected.set()
        finally:
            self._is_connecting = False


def new_client(host: str, port: int, timeout: float, options: dict[str, object],
                tls: TlsFiles | None) -> aetcd.Client:
    if tls is None:
        return aetcd.Client(host=host, port=port, timeout=timeout, options=options)
    if host.startswith("ipv4:"):  # several members: check their certificates against one name
        options = {**options,
                   "grpc.ssl_target_name_override": host.removeprefix("ipv4:").split(",")[0]
                   .rpartition(":")[0]}
    return _TlsClient(host=host, port=port, timeout=timeout, options=options, tls=tls)
