"""Placement halts: the leader stops placing a model whose current load generation failed to load
on `halt_after` distinct servers, so one bad deployment cannot walk the fleet server by server.

The leader keeps, per model, a `LoadFailures` record in etcd (written fenced on its term, so it
survives a failover): the servers where this generation reported FAILED, with their reasons, and
when it halted. A new generation (`RetryModel`, or undeploy and deploy) starts a fresh record.
Plain functions of the view: the leader computes the records (`updated`), writes the difference
(`changes`) and plans with the records it just computed (its own watch may not have them yet);
any replica answering `meshctl models` reads the same records from its view.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace
from services.common.lifecycle import now_ms
from services.common.membership import MeshView

log = logging.getLogger(__name__)

DEFAULT_HALT_AFTER = 2
MAX_REASON_CHARS = 512


def failed_now(view: MeshView, model: str, generation: int) -> dict[str, str]:
    """Servers reporting this generation of `model` FAILED right now -> reason."""
    return {sid: st.reason for (sid, m), st in view.statuses.items()
            if m == model and st.managed and st.state == cp.MODEL_STATE_FAILED
            and st.generation == generation}


def _updated(view: MeshView, spec: cp.ModelSpec, halt_after: int) -> cp.LoadFailures:
    current = view.load_failures.get(spec.name)
    record = cp.LoadFailures(model=spec.name, generation=spec.generation)
    if current is not None and current.model == spec.name and current.generation == spec.generation:
        record.CopyFrom(current)
    known = {f.server_id for f in record.failures}
    for sid, reason in sorted(failed_now(view, spec.name, spec.generation).items()):
        if sid not in known:
            record.failures.add(server_id=sid, reason=reason[:MAX_REASON_CHARS], at_ms=now_ms())
    if halt_after > 0 and not record.halted_since_ms and len(record.failures) >= halt_after:
        record.halted_since_ms = now_ms()
        log.warning("model %s failed to load on %d servers (%s); placement halted until "
                    "`meshctl model retry %s` or a new deployment", spec.name, len(record.failures),
                    ", ".join(f.server_id for f in record.failures), spec.name)
    return record


Records = Mapping[str, cp.LoadFailures]


def updated(view: MeshView, models: dict[str, cp.ModelSpec], halt_after: int) -> dict[str, cp.LoadFailures]:
    """The records as they should be now: the stored ones plus the failures reported since."""
    out = {}
    for name, spec in models.items():
        record = _updated(view, spec, halt_after)
        if record.failures or name in view.load_failures:
            out[name] = record
    return out


def changes(view: MeshView, records: Records) -> tuple[dict[str, bytes], list[str]]:
    """The puts and deletes that bring etcd in line with `records`."""
    puts = {keyspace.load_failures_key(name): keyspace.encode(record)
            for name, record in records.items()
            if name not in view.load_failures
            or keyspace.encode(view.load_failures[name]) != keyspace.encode(record)}
    deletes = [keyspace.LOAD_FAILURES + name for name in view.load_failures if name not in records]
    return puts, deletes


def halted(records: Records, spec: cp.ModelSpec) -> cp.LoadFailures | None:
    """The record that halts this generation of the model, if one does."""
    record = records.get(spec.name)
    if record is None or record.generation != spec.generation or not record.halted_since_ms:
        return None
    return record


def current_failures(records: Records, spec: cp.ModelSpec) -> list[cp.LoadFailure]:
    record = records.get(spec.name)
    if record is None or record.generation != spec.generation:
        return []
    return list(record.failures)


def halt_reason(record: cp.LoadFailures) -> str:
    where = "; ".join(f"{f.server_id}: {f.reason}" for f in record.failures[:3])
    more = f" and {len(record.failures) - 3} more" if len(record.failures) > 3 else ""
    return (f"HALTED: failed to load on {len(record.failures)} servers ({where}{more}); fix the "
            f"cause, then `meshctl model retry {record.model}`")
