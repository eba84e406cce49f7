"""The operator's traffic-policy writes: set, delete, and a hand on a canary. Plain Python.

A policy is checked on its own (records.parse: INVALID_ARGUMENT) and against everything stored
(graph.check_write: FAILED_PRECONDITION for a target naming nothing, a cycle, a name that is a
deployment). Then one etcd transaction writes it only if the guard key is unchanged since the
policies were read, and rewrites the guard: two replicas that each checked the graph cannot both
commit policies that together close a cycle. Deploy and undeploy ask `deploy_problem` /
`undeploy_problem` so a deployment never shadows a policy and an undeploy never leaves one
dangling.
"""

from __future__ import annotations

import logging

from meshserve.v1 import traffic_pb2 as tp

from services.common import keyspace, names
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.etcd_client import EtcdClient, EtcdError, retrying
from services.common.etcd_txn import TxnResult, delete_op, put_op, txn, unchanged
from services.common.lifecycle import now_ms
from services.common.membership import MeshView
from services.common.traffic import graph, records
from services.common.traffic.records import Policy

from .traffic_status import policy_status

log = logging.getLogger(__name__)

CAS_ATTEMPTS = 5
READ_TIMEOUT_S = 3.0
MAX_REASON_CHARS = 256


def stored_policies(view: MeshView) -> dict[str, Policy]:
    """The valid policies of a view (an invalid record refers to nothing)."""
    out = {}
    for name, msg in view.traffic_policies.items():
        try:
            out[name] = records.parse(msg)
        except InvalidArgument:
            continue
    return out


def deploy_problem(view: MeshView, name: str) -> str:
    """Why `name` may not be deployed ('' = it may)."""
    if name in view.traffic_policies:
        return (f"{name!r} is the name of a traffic policy; deploy versions as {name}@VERSION, or "
                "delete the policy first (meshctl traffic delete)")
    return ""


def undeploy_problem(view: MeshView, name: str) -> str:
    """Why `name` may not be undeployed ('' = it may)."""
    users = graph.referrers(name, stored_policies(view), view.known_models())
    if users:
        return (f"model {name!r} is a target of traffic policy {', '.join(users)}; change or delete "
                "that policy first (meshctl traffic ...)")
    return ""


class TrafficOps:
    def __init__(self, etcd: EtcdClient, view: MeshView, view_wait_s: float = 3.0) -> None:
        self._etcd = etcd
        self._view = view
        self._view_wait_s = view_wait_s

    async def _read(self) -> tuple[dict[str, Policy], dict[str, tp.TrafficPolicy], int]:
        """Stored policies (valid ones parsed, every record raw) and the guard's mod revision."""
        async def read() -> tuple[dict[str, bytes], int]:
            _, guard = await self._etcd.read(keyspace.TRAFFIC_GUARD, READ_TIMEOUT_S)
            items, _ = await self._etcd.get_prefix(keyspace.TRAFFIC_POLICIES)
            return items, guard
        try:
            items, guard = await retrying(read)
        except EtcdError as exc:
            raise Unavailable(f"etcd is unreachable or has no quorum ({type(exc).__name__}); nothing "
                              "changed") from exc
        raw, parsed = {}, {}
        for key, value in items.items():
            msg = keyspace.decode(tp.TrafficPolicy, value)
            name = keyspace.id_from_key(keyspace.TRAFFIC_POLICIES, key)
            if msg is None:
                continue
            raw[name] = msg
            try:
                parsed[name] = records.parse(msg)
            except InvalidArgument:
                continue
        return parsed, raw, guard

    async def _commit(self, key: str, compare: list, ops: list) -> TxnResult:
        try:
            result = await retrying(lambda: txn(self._etcd, compare, ops))
        except EtcdError as exc:
            raise Unavailable(f"etcd did not confirm the write ({type(exc).__name__}: {exc}); check "
                              "`meshctl traffic list` before trying again") from exc
        if result.changed:
            await self._view.wait_for_revision(key, result.revision, self._view_wait_s)
        return result

    async def set(self, requested: tp.TrafficPolicy) -> tp.TrafficPolicy:
        msg = tp.TrafficPolicy()
        msg.CopyFrom(requested)
        policy = records.parse(msg)
        key = keyspace.traffic_policy_key(policy.name)
        for _ in range(CAS_ATTEMPTS):
            stored, raw, guard = await self._read()
            graph.check_write(policy, {n: p for n, p in stored.items() if n != policy.name},
                              self._view.known_models())
            previous = raw.get(policy.name)
            msg.updated_ms = now_ms()
            msg.generation = max(msg.updated_ms, previous.generation + 1 if previous is not None else 0)
            ops = [put_op(key, keyspace.encode(msg)), put_op(keyspace.TRAFFIC_GUARD, b"")]
            if (await self._commit(key, [unchanged(self._etcd, keyspace.TRAFFIC_GUARD, guard)], ops)).succeeded:
                log.info("traffic policy %s (%s) written, generation %d", policy.name, policy.kind, msg.generation)
                return msg
        raise Unavailable("traffic policies kept changing under concurrent writers; try again")

    async def delete(self, name: str) -> None:
        names.check_name("traffic policy name", name)
        key = keyspace.traffic_policy_key(name)
        for _ in range(CAS_ATTEMPTS):
            stored, raw, guard = await self._read()
            if name not in raw:
                known = ", ".join(sorted(raw)) or "none"
                raise NotFound(f"no traffic policy {name!r} (policies: {known})")
            rest = {n: p for n, p in stored.items() if n != name}
            users = [n for n, p in rest.items() if name in p.targets()
                     and not graph.exists(name, {}, self._view.known_models())]
            if users:
                raise FailedPrecondition(f"traffic policy {name!r} is a target of {', '.join(sorted(users))}; "
                                         "change or delete those first")
            ops = [delete_op(key), delete_op(keyspace.canary_state_key(name)),
                   put_op(keyspace.TRAFFIC_GUARD, b"")]
            if (await self._commit(key, [unchanged(self._etcd, keyspace.TRAFFIC_GUARD, guard)], ops)).succeeded:
                return
        raise Unavailable("traffic policies kept changing under concurrent writers; try again")

    async def control_canary(self, name: str, action: int, reason: str) -> tp.TrafficPolicyStatus:
        """An operator's promote / rollback / restart, written only if the state is unchanged."""
        if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
            raise InvalidArgument(f"reason must be printable text of at most {MAX_REASON_CHARS} characters")
        msg = self._view.traffic_policies.get(names.check_name("traffic policy name", name))
        if msg is None or msg.WhichOneof("kind") != "canary":
            raise NotFound(f"no canary traffic policy {name!r}")
        spec = records.parse(msg).spec
        assert isinstance(spec, records.Canary)
        key = keyspace.canary_state_key(name)
        for _ in range(CAS_ATTEMPTS):
            value, mod = await retrying(lambda: self._etcd.read(key, READ_TIMEOUT_S))
            state = keyspace.decode(tp.CanaryState, value) if value else None
            if state is None or state.generation != msg.generation:
                state = tp.CanaryState(name=name, generation=msg.generation, phase=tp.CANARY_PHASE_PROGRESSING,
                                       step_since_ms=now_ms())
            new = _operator_state(state, spec, action, reason or "operator")
            ops = [put_op(key, keyspace.encode(new))]
            if (await self._commit(key, [unchanged(self._etcd, key, mod)], ops)).succeeded:
                return policy_status(self._view, name)
        raise Unavailable(f"canary {name!r} kept changing (the leader is judging it); try again")


def _operator_state(state: tp.CanaryState, spec: records.Canary, action: int, reason: str) -> tp.CanaryState:
    new = tp.CanaryState()
    new.CopyFrom(state)
    new.updated_ms = new.step_since_ms = now_ms()
    new.decided_by = "operator"
    if action == tp.CANARY_ACTION_PROMOTE:
        if new.phase == tp.CANARY_PHASE_PROGRESSING and new.step + 1 < len(spec.steps):
            new.step += 1
            new.reason = f"promoted by an operator to step {new.step + 1} ({spec.steps[new.step]}%): {reason}"
        else:
            new.phase = tp.CANARY_PHASE_PROMOTED
            new.reason = f"promoted to 100% by an operator: {reason}"
    elif action == tp.CANARY_ACTION_ROLLBACK:
        new.phase = tp.CANARY_PHASE_ROLLED_BACK
        new.reason = f"rolled back by an operator: {reason}"
    elif action == tp.CANARY_ACTION_RESTART:
        new.phase, new.step = tp.CANARY_PHASE_PROGRESSING, 0
        new.reason = f"restarted by an operator at step 1 ({spec.steps[0]}%): {reason}"
    else:
        raise InvalidArgument("action must be PROMOTE, ROLLBACK or RESTART")
    return new

