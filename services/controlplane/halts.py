"""Placement halts: the leader stops placing a model whose current load generation failed to load
on `halt_after` distinct servers, so one bad deployment cannot walk the fleet server by server.

The leader keeps, per model, a `LoadFailures` record in etcd (written fenced on its term, so it
survives a failover): the servers where this generation reported FAILED, with their reasons, and
when it halted. A new generation (`RetryModel`, or undeploy and deploy) starts a fresh record.
Plain functions of the view: the reconciler writes what `records_to_write` returns, and any
replica answering `meshctl models` reads the same records.
"""

from __future__ import annotations

import logging

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


def records_to_write(view: MeshView, models: dict[str, cp.ModelSpec],
                     halt_after: int) -> tuple[dict[str, bytes], list[str]]:
    """The LoadFailures puts and deletes that bring etcd in line with the statuses seen."""
    puts: dict[str, bytes] = {}
    for name, spec in models.items():
        record = _updated(view, spec, halt_after)
        current = view.load_failures.get(name)
        if not record.failures and current is None:
            continue
        if current is None or keyspace.encode(current) != keyspace.encode(record):
            puts[keyspace.load_failures_key(name)] = keyspace.encode(record)
    deletes = [keyspace.LOAD_FAILURES + name for name in view.load_failures if name not in models]
    return puts, deletes


def halted(view: MeshView, spec: cp.ModelSpec) -> cp.LoadFailures | None:
    """The record that halts this generation of the model, if one does."""
    record = view.load_failures.get(spec.name)
    if record is None or record.generation != spec.generation or not record.halted_since_ms:
        return None
    return record


def current_failures(view: MeshView, spec: cp.ModelSpec) -> list[cp.LoadFailure]:
    record = view.load_failures.get(spec.name)
    if record is None or record.generation != spec.generation:
        return []
    return list(record.failures)


def halt_reason(record: cp.LoadFailures) -> str:
    where = "; ".join(f"{f.server_id}: {f.reason}" for f in record.failures[:3])
    more = f" and {len(record.failures) - 3} more" if len(record.failures) > 3 else ""
    return (f"HALTED: failed to load on {len(record.failures)} servers ({where}{more}); fix the "
            f"cause, then `meshctl model retry {record.model}`")
