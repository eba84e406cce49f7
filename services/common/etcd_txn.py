"""Compare-and-swap writes for operator state (deploy, scale, undeploy, retry), each one etcd
transaction that reports the store revision it committed at, so the caller can wait for its own
watch to reach that revision before it answers (read-your-writes).

The election's campaign and the leader's fenced writes live in etcd_client.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import aetcd.exceptions
import aetcd.rpc as rpc
import grpc

from .etcd_client import EtcdClient


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # store revision after the transaction
    changed: bool  # whether it wrote anything (a delete of nothing changes nothing)
    uncertain: bool = False  # set by callers that retried: an earlier attempt may have committed


def put_op(key: str, value: bytes) -> rpc.RequestOp:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key.encode(), value=value))


def delete_op(key: str) -> rpc.RequestOp:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key.encode()))


def delete_prefix_op(prefix: str) -> rpc.RequestOp:
    """Delete every key under `prefix` (a range up to the prefix with its last byte + 1)."""
    key = prefix.encode()
    end = key[:-1] + bytes([key[-1] + 1])
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=end))


def absent(client: EtcdClient, key: str):
    """Compare: the key does not exist."""
    return client.raw.transactions.create(key.encode()) == 0


def present(client: EtcdClient, key: str):
    """Compare: the key exists."""
    return client.raw.transactions.create(key.encode()) > 0


def unchanged(client: EtcdClient, key: str, mod_revision: int):
    """Compare: the key was last written at mod_revision (0: still absent)."""
    return client.raw.transactions.mod(key.encode()) == mod_revision


async def txn(client: EtcdClient, compare: list, success: list[rpc.RequestOp],
              timeout: float | None = None) -> TxnResult:
    """One transaction; etcd errors come out as aetcd ClientError (an EtcdError)."""
    raw = client.raw
    await raw.connect()
    request = rpc.TxnRequest(compare=[c.build_message() for c in compare], success=success)
    try:
        response = await raw.kvstub.Txn(request, timeout=timeout or client.timeout,
                                        metadata=raw.metadata)
    except grpc.aio.AioRpcError as exc:
        raise aetcd.exceptions.ClientError(f"{exc.code().name}: {exc.details()}") from exc
    changed = response.succeeded and any(
        r.WhichOneof("response") == "response_put" or
        (r.WhichOneof("response") == "response_delete_range" and r.response_delete_range.deleted)
        for r in response.responses)
    return TxnResult(bool(response.succeeded), int(response.header.revision), bool(changed))
