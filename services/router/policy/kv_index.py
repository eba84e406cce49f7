"""What each replica really has cached, from the KV events its server streams (load stream).

Per replica: the cache info (namespace, block size, tokenizer), the epoch and last sequence number
of its event log, and the keys it holds in its own pool (`local`) and knows to be in the shared
store (`shared`). A snapshot replaces the replica's state; events apply in order; an event whose
sequence number is not the next one, or an epoch that changed without a snapshot, drops the
replica's state and asks for a snapshot (the load stream is reopened), so the index is never
silently wrong for long. A replica with no state is scored by the text guess (prefix.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from meshserve.v1 import modelserver_pb2 as pb

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheInfo:
    namespace: bytes
    block_size: int
    tokenizer_digest: str


@dataclass
class ReplicaCache:
    info: CacheInfo
    epoch: int
    seq: int = 0
    local: set[bytes] = field(default_factory=set)
    shared: set[bytes] = field(default_factory=set)

    def apply(self, e: pb.KvEvent) -> None:
        keys = self.local if e.tier == pb.KV_TIER_LOCAL else self.shared
        if e.kind == pb.KV_EVENT_KIND_STORED:
            keys.update(e.block_keys)
        elif e.kind == pb.KV_EVENT_KIND_REMOVED:
            keys.difference_update(e.block_keys)
        elif e.kind == pb.KV_EVENT_KIND_CLEARED:
            keys.clear()


class KvIndex:
    def __init__(self) -> None:
        self._replicas: dict[str, ReplicaCache] = {}

    def apply(self, replica_id: str, msg: pb.KvEvents) -> bool:
        """Fold one message in; False when events were missed (the caller asks for a snapshot)."""
        info = CacheInfo(bytes(msg.info.namespace), msg.info.block_size, msg.info.tokenizer_digest)
        if info.block_size < 1 or len(info.namespace) != 32:
            log.warning("replica %s sent KV events without usable cache info; ignored", replica_id)
            self._replicas.pop(replica_id, None)
            return True
        if msg.snapshot:
            rc = self._replicas[replica_id] = ReplicaCache(info, msg.epoch)
            for e in msg.events:
                rc.apply(e)
                rc.seq = max(rc.seq, e.seq)
            log.info("KV snapshot from replica %s: %d events, up to seq %d", replica_id, len(msg.events), rc.seq)
            return True
        cur = self._replicas.get(replica_id)
        if cur is None or cur.epoch != msg.epoch or cur.info != info:
            self._replicas.pop(replica_id, None)
            return False
        rc = cur
        for e in msg.events:
            if e.seq != rc.seq + 1:
                log.warning("replica %s: KV event %d after %d (missed events); resynchronising", replica_id,
                            e.seq, rc.seq)
                self._replicas.pop(replica_id, None)
                return False
            rc.apply(e)
            rc.seq = e.seq
        return True

    def forget(self, replica_id: str) -> None:
        self._replicas.pop(replica_id, None)

    def get(self, replica_id: str) -> ReplicaCache | None:
        return self._replicas.get(replica_id)

    def match(self, replica_id: str, keys: list[bytes]) -> tuple[int, int]:
        """(blocks in the replica's pool, further blocks any replica of the namespace put in the
        shared store) for the leading run of `keys`."""
        rc = self._replicas.get(replica_id)
        if rc is None:
            return 0, 0
        local = 0
        for k in keys:
            if k not in rc.local:
                break
            local += 1
        peers = [r.shared for r in self._replicas.values() if r.info.namespace == rc.info.namespace]
        shared = 0
        for k in keys[local:]:
            if not any(k in s for s in peers):
                break
            shared += 1
        return local, shared
