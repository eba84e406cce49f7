"""Answers about "now" (who leads, is the control plane's view current) from a linearizable read
of etcd with a short timeout, never from a watch.

A watch is served by whichever etcd member the client reached; a member cut off from the others
keeps the watch open and simply sends nothing, so a view built from it looks healthy while it
goes stale (a leader that has stepped down is still "the leader" there). A linearizable read goes
through the raft leader: it fails when the member has no quorum, which is exactly the signal.
"""

from __future__ import annotations

import logging

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace
from services.common.errors import Unavailable
from services.common.etcd_client import EtcdClient, EtcdError

log = logging.getLogger(__name__)

#: Long enough for a healthy cluster under load, short enough for `meshctl status` to answer.
READ_TIMEOUT_S = 2.0


async def read_leader(etcd: EtcdClient, timeout: float = READ_TIMEOUT_S
                      ) -> tuple[cp.LeaderRecord | None, str]:
    """(the leader or None, '') when etcd answered; (None, why) when it could not."""
    try:
        value, _ = await etcd.read(keyspace.ELECTION, timeout)
    except EtcdError as exc:
        detail = str(exc) or type(exc).__name__
        return None, (f"etcd gave no linearizable answer within {timeout:g}s (unreachable, or the "
                      f"members reached have no quorum): {detail}")
    if value is None:
        return None, ""
    record = keyspace.decode(cp.LeaderRecord, value)
    if record is None:
        log.error("the election key holds a value that cannot be decoded; ignoring it")
    return record, ""


async def current_leader(etcd: EtcdClient, timeout: float = READ_TIMEOUT_S) -> cp.LeaderRecord:
    leader, problem = await read_leader(etcd, timeout)
    if problem:
        raise Unavailable(f"cannot tell who leads the control plane: {problem}; retry in a few "
                          "seconds")
    if leader is None:
        raise Unavailable("no control-plane leader right now (election in progress); retry in a "
                          "few seconds")
    return leader
