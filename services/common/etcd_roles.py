"""Which etcd keys each component may read and write: the role etcd enforces once auth is on.

etcd takes the CN of a client certificate as the user name (certs.py puts the component's name
there), and each user gets a role of the same name with these grants. Least privilege: a model
server writes only its own membership and status keys and reads only its own placements; a
router reads the mesh and writes only its own membership and canary figures; the control plane
manages everything under /meshserve/. A component kind missing here gets no role: it can read
nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import keyspace

READ, WRITE, READWRITE = "read", "write", "readwrite"


@dataclass(frozen=True)
class Grant:
    permission: str  # READ, WRITE or READWRITE
    key: str
    prefix: bool  # the whole range under `key`, else the one key


def grants(kind: str, name: str) -> list[Grant]:
    if kind == "controlplane":
        return [Grant(READWRITE, keyspace.ROOT, True)]
    if kind == "server":
        return [Grant(READWRITE, keyspace.server_key(name), False),
                Grant(READWRITE, keyspace.STATUS + name + "/", True),
                Grant(READ, keyspace.placement_prefix(name), True)]
    if kind == "router":
        return [Grant(READ, keyspace.ROOT, True),
                Grant(READWRITE, keyspace.router_key(name), False),
                Grant(READWRITE, keyspace.TRAFFIC_STATS, True)]
    if kind == "jobworker":  # watches the mesh like a router, registers itself
        return [Grant(READ, keyspace.ROOT, True),
                Grant(READWRITE, keyspace.jobworker_key(name), False)]
    if kind == "gateway":
        return [Grant(READWRITE, keyspace.gateway_key(name), False)]
    if kind == "client":  # read-only tooling: readiness checks, `meshctl`-side inspection, tests
        return [Grant(READ, keyspace.ROOT, True)]
    return []


def prefix_end(key: str) -> bytes:
    """etcd's range end for "every key starting with `key`"."""
    raw = bytearray(key.encode())
    raw[-1] += 1
    return bytes(raw)
