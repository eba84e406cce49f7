"""The etcd layer on a real etcd: leases that re-register, watches that lose nothing."""

from __future__ import annotations

import asyncio

import pytest

from services.common.etcd_client import EtcdClient, LeaseKeeper, PrefixMirror, _grpc_target, parse_endpoints
from tests.helpers import EtcdCluster, retry, until

pytestmark = pytest.mark.e2e


def test_endpoint_parsing():
    assert parse_endpoints("127.0.0.1:1, 127.0.0.1:2") == ["127.0.0.1:1", "127.0.0.1:2"]
    assert _grpc_target(["127.0.0.1:1", "127.0.0.1:2"]) == ("ipv4:127.0.0.1:1,127.0.0.1", 2)
    assert _grpc_target(["etcd:2379"]) == ("etcd", 2379)
    with pytest.raises(ValueError):
        parse_endpoints("")
    with pytest.raises(ValueError):
        parse_endpoints("nohostport")


async def test_lost_lease_means_register_again(etcd: EtcdCluster):
    client = EtcdClient(etcd.endpoints)
    keeper = LeaseKeeper(client, ttl=2)
    await keeper.put("/t/server", b"v1")
    await keeper.start()
    assert await client.get("/t/server") == b"v1"
    # Someone (or a long partition) kills the lease: the key vanishes ...
    assert keeper.lease_id is not None
    await client.revoke_lease(keeper.lease_id)
    assert await client.get("/t/server") is None
    # ... and the keeper notices at its next renewal and puts it back on a new lease.
    await until(lambda: keeper.reregistrations >= 1, what="re-registration")

    async def key_is_back() -> bytes | None:
        value = await client.get("/t/server")
        if value is None:
            raise LookupError("not put back yet")  # the new lease is granted before the keys go back
        return value
    assert await retry(key_is_back) == b"v1"
    await keeper.stop(revoke=True)
    assert await client.get("/t/server") is None
    await client.close()


async def test_mirror_resumes_from_last_revision_across_an_etcd_restart(etcd: EtcdCluster):
    writer = EtcdClient(etcd.endpoints)
    await writer.put("/t/m/a", b"1")
    reader = EtcdClient(etcd.endpoints)
    seen: list[tuple[str, bytes | None]] = []
    mirror = PrefixMirror(reader, "/t/m/", lambda k, v: seen.append((k, v)))
    await mirror.start()
    assert mirror.items == {"/t/m/a": b"1"}
    await writer.put("/t/m/b", b"2")
    await until(lambda: "/t/m/b" in mirror.items, what="watch event")

    # etcd goes away: the mirror keeps its last state (read-only mode).
    etcd.sup.stop_child(etcd.children["etcd0"])
    await until(lambda: not mirror.connected, what="mirror to notice")
    assert mirror.items == {"/t/m/a": b"1", "/t/m/b": b"2"}

    # etcd returns; changes made before the mirror reconnects are still delivered.
    await asyncio.get_running_loop().run_in_executor(None, etcd.start_member, 0)
    await until(etcd.healthy, what="etcd back")
    await retry(lambda: writer.put("/t/m/c", b"3"))  # its channel may still be backing off
    await retry(lambda: writer.delete("/t/m/a"))
    await until(lambda: mirror.items == {"/t/m/b": b"2", "/t/m/c": b"3"}, what="catch up")
    assert ("/t/m/a", None) in seen and ("/t/m/c", b"3") in seen
    await mirror.stop()
    await reader.close()
    await writer.close()
