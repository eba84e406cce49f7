"""The operator's writes (deploy, scale, undeploy, retry, drain, undrain, routing policy): desired
state put into etcd by whichever replica answers. Plain Python, no gRPC: each method validates,
commits one etcd transaction, waits until this replica's watch has seen its own write
(read-your-writes), and returns what the answer shows. Errors are services.common.errors.

Every write that depends on what is stored compares it in the same transaction: a deploy creates
the model only if it is absent, scale and retry rewrite it only if nobody changed it since it was
read (and read it again if somebody did), an undeploy deletes it only if it is there.
"""

from __future__ import annotations

import dataclasses
import logging

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace, names
from services.common.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from services.common.etcd_client import EtcdClient, EtcdError, retrying
from services.common.etcd_txn import (
    TxnResult,
    absent,
    delete_op,
    delete_prefix_op,
    present,
    put_op,
    txn,
    unchanged,
)
from services.common.lifecycle import now_ms
from services.common.membership import MeshView

from . import desired, specs, status
from .traffic_ops import deploy_problem, undeploy_problem

log = logging.getLogger(__name__)

DEFAULT_DRAIN_WAIT_S = 30
MAX_DRAIN_WAIT_S = 3600
MAX_REASON_CHARS = 256
#: Read-modify-write rounds before giving up when other writers keep changing a model.
CAS_ATTEMPTS = 5
READ_TIMEOUT_S = 3.0


class Operations:
    def __init__(self, etcd: EtcdClient, view: MeshView, view_wait_s: float = 3.0) -> None:
        self._etcd = etcd
        self._view = view
        self._view_wait_s = view_wait_s

    # --- plumbing ----------------------------------------------------------------------------

    async def _commit(self, key: str, compare: list, ops: list) -> TxnResult:
        """One transaction (retried through transient etcd errors), then read-your-writes.
        `uncertain` on the result: an earlier attempt failed without an answer, so a compare
        that fails now may be our own first attempt having committed."""
        attempts = 0

        async def once() -> TxnResult:
            nonlocal attempts
            attempts += 1
            return await txn(self._etcd, compare, ops)
        try:
            result = await retrying(once)
            result = dataclasses.replace(result, uncertain=attempts > 1)
        except EtcdError as exc:
            raise Unavailable(f"etcd did not confirm the write ({type(exc).__name__}: {exc}); it "
                              "may or may not have been applied: check (meshctl models / servers) "
                              "before trying again") from exc
        if result.changed and not await self._view.wait_for_revision(key, result.revision,
                                                                     self._view_wait_s):
            log.warning("write to %s committed at revision %d, but this replica's watch has not "
                        "seen it after %.1fs; answering from the last view", key, result.revision,
                        self._view_wait_s)
        return result

    async def _read_spec(self, name: str) -> tuple[cp.ModelSpec, int]:
        names.check_model_name(name)
        try:
            value, mod = await retrying(lambda: self._etcd.read(keyspace.model_key(name),
                                                                READ_TIMEOUT_S))
        except EtcdError as exc:
            raise Unavailable(f"etcd is unreachable or has no quorum ({type(exc).__name__}); "
                              "nothing changed") from exc
        if value is None:
            known = ", ".join(sorted(self._view.models)) or "none"
            raise NotFound(f"model {name!r} is not deployed (deployed: {known})")
        spec = keyspace.decode(cp.ModelSpec, value)
        if spec is None:
            raise FailedPrecondition(f"the stored deployment of {name!r} cannot be decoded; "
                                     "undeploy it and deploy it again")
        return spec, mod

    def _deployment(self, spec: cp.ModelSpec) -> cp.Deployment:
        found = next((d for d in desired.deployments(self._view) if d.spec.name == spec.name), None)
        return found if found is not None else cp.Deployment(spec=spec)

    def _known_regions(self) -> set[str]:
        return {s.region for s in self._view.servers.values()}

    # --- models ------------------------------------------------------------------------------

    async def deploy(self, requested: cp.ModelSpec) -> cp.Deployment:
        spec = cp.ModelSpec()
        spec.CopyFrom(requested)
        spec.backend = spec.backend or "sim"
        specs.validate_spec(spec, self._known_regions())
        if deploy_problem(self._view, spec.name):
            raise FailedPrecondition(deploy_problem(self._view, spec.name))
        spec.created_ms = spec.updated_ms = spec.generation = now_ms()
        key, value = keyspace.model_key(spec.name), keyspace.encode(spec)
        result = await self._commit(key, [absent(self._etcd, key)], [
            put_op(key, value), delete_op(keyspace.load_failures_key(spec.name))])
        if not result.succeeded:
            if result.uncertain:  # our first attempt may have committed before its reply was lost
                stored, _ = await self._read_spec(spec.name)
                if keyspace.encode(stored) == value:
                    return self._deployment(spec)
            raise AlreadyExists(f"model {spec.name!r} is already deployed; use ScaleModel "
                                "(meshctl model scale) or undeploy it first")
        return self._deployment(spec)

    async def _rewrite(self, name: str, change, clear_failures: bool = False) -> cp.Deployment:
        """Read, change, write back only if unchanged meanwhile; again if it was changed."""
        for _ in range(CAS_ATTEMPTS):
            current, mod = await self._read_spec(name)
            spec = cp.ModelSpec()
            spec.CopyFrom(current)
            change(spec)
            spec.updated_ms = now_ms()
            key = keyspace.model_key(name)
            ops = [put_op(key, keyspace.encode(spec))]
            if clear_failures:
                ops.append(delete_op(keyspace.load_failures_key(name)))
            if (await self._commit(key, [unchanged(self._etcd, key, mod)], ops)).succeeded:
                return self._deployment(spec)
        raise Unavailable(f"model {name!r} kept changing under concurrent writers; try again")

    async def scale(self, name: str, replicas: int, regions) -> cp.Deployment:
        specs.validate_replicas(replicas)

        def change(spec: cp.ModelSpec) -> None:
            wanted = regions if len(regions) else spec.regions
            specs.validate_regions(wanted, replicas, self._known_regions())
            spec.replicas = replicas
            if len(regions):
                del spec.regions[:]
                spec.regions.extend(regions)
        return await self._rewrite(name, change)

    async def retry(self, name: str) -> cp.Deployment:
        """A new load generation: the halt is lifted and every placement loads again."""
        def change(spec: cp.ModelSpec) -> None:
            problem = specs.stored_spec_problem(name, spec)
            if problem:  # loading it again cannot help; the record itself must be replaced
                raise FailedPrecondition(problem)
            spec.generation = max(now_ms(), spec.generation + 1)
        return await self._rewrite(name, change, clear_failures=True)

    async def undeploy(self, name: str) -> None:
        names.check_model_name(name)
        if undeploy_problem(self._view, name):
            raise FailedPrecondition(undeploy_problem(self._view, name))
        key = keyspace.model_key(name)
        # Its autoscale policy, decision and rate history go with it: deploying again starts afresh.
        result = await self._commit(key, [present(self._etcd, key)], [
            delete_op(key), delete_op(keyspace.load_failures_key(name)),
            delete_op(keyspace.autoscale_policy_key(name)),
            delete_op(keyspace.autoscale_state_key(name)),
            delete_prefix_op(keyspace.history_prefix(name))])
        if not result.succeeded:
            known = ", ".join(sorted(self._view.models)) or "none"
            raise NotFound(f"model {name!r} is not deployed (deployed: {known})")

    # --- servers and policy ------------------------------------------------------------------

    def _require_server(self, server_id: str, allow_drained: bool = False) -> None:
        names.check_server_id(server_id)
        if server_id in self._view.servers or (allow_drained and self._view.is_draining(server_id)):
            return
        known = ", ".join(sorted(self._view.servers)) or "none"
        raise NotFound(f"server {server_id!r} is not a member of the mesh (members: {known})")

    async def drain(self, server_id: str, reason: str, wait_seconds: int) -> cp.ServerStatus | None:
        self._require_server(server_id)
        if not 0 <= wait_seconds <= MAX_DRAIN_WAIT_S:
            raise InvalidArgument(f"wait_seconds must be in [0, {MAX_DRAIN_WAIT_S}], got {wait_seconds}")
        if len(reason) > MAX_REASON_CHARS or not reason.isprintable():
            raise InvalidArgument(f"reason must be printable text of at most {MAX_REASON_CHARS} "
                                  "characters")
        wait = wait_seconds or DEFAULT_DRAIN_WAIT_S
        record = cp.DrainRecord(server_id=server_id, reason=reason or "operator",
                                since_ms=now_ms(), release_deadline_ms=now_ms() + wait * 1000)
        key = keyspace.drain_key(server_id)
        await self._commit(key, [], [put_op(key, keyspace.encode(record))])
        return status.server_status(self._view, server_id)

    async def undrain(self, server_id: str) -> cp.ServerStatus | None:
        self._require_server(server_id, allow_drained=True)
        key = keyspace.drain_key(server_id)
        await self._commit(key, [], [delete_op(key)])
        return status.server_status(self._view, server_id)

    async def set_policy(self, requested: cp.RoutingPolicy) -> cp.RoutingPolicy:
        policy = cp.RoutingPolicy()
        policy.CopyFrom(requested)
        specs.validate_policy(policy)
        policy.updated_ms = now_ms()
        key = keyspace.ROUTING_POLICY
        await self._commit(key, [], [put_op(key, keyspace.encode(policy))])
        return policy
