"""The operator's autoscaling writes: a model's policy and the scaling budgets. Like the other
operator writes (operations.py): validated, one etcd transaction, read-your-writes."""

from __future__ import annotations

from meshserve.v1 import autoscale_pb2 as asp

from services.common import keyspace, names
from services.common.errors import InvalidArgument
from services.common.etcd_txn import present, put_op
from services.common.lifecycle import now_ms

from .. import budgets
from ..operations import Operations
from .policy import as_record, validate


class AutoscaleSettings(Operations):
    async def set_policy(self, requested: asp.AutoscalePolicy) -> asp.AutoscalePolicy:
        record = asp.AutoscalePolicy()
        record.CopyFrom(requested)
        names.check_model_name(record.model)
        spec = self._view.models.get(record.model)
        if spec is None:
            raise InvalidArgument(self._unknown(record.model))
        policy = validate(record)
        minimums = sum(r.min_replicas for r in spec.regions)
        if minimums > policy.max_replicas or (policy.scale_to_zero and minimums):
            raise InvalidArgument(f"model {record.model!r} has regional minimums adding up to "
                                  f"{minimums}; max_replicas ({policy.max_replicas}) must allow "
                                  "them and scale_to_zero cannot apply while they exist")
        record.updated_ms = now_ms()
        key = keyspace.autoscale_policy_key(record.model)
        model_key = keyspace.model_key(record.model)
        result = await self._commit(key, [present(self._etcd, model_key)],
                                    [put_op(key, keyspace.encode(record))])
        if not result.succeeded:
            raise InvalidArgument(f"unknown model {record.model!r}: it was undeployed meanwhile")
        return as_record(policy, record.updated_ms)

    def _unknown(self, name: str) -> str:
        """Why `name` has no policy: not deployed, or a traffic-policy name / version alias, which
        routes to deployments that each scale on their own."""
        versions = sorted(m for m in self._view.models if names.split_version(m)[0] == name)
        if name in self._view.traffic_policies or versions:
            what = "a traffic policy" if name in self._view.traffic_policies else "a version alias"
            return (f"unknown model {name!r}: it is {what}, not a deployment; autoscale each deployment "
                    f"it routes to ({', '.join(versions) or 'its targets'}) instead")
        known = ", ".join(sorted(self._view.models)) or "none"
        return f"unknown model {name!r}: deploy it first (deployed: {known})"

    async def set_budgets(self, requested: asp.ScalingBudgets) -> asp.ScalingBudgets:
        record = asp.ScalingBudgets()
        record.CopyFrom(requested)
        budgets.validate_record(record)
        record.updated_ms = now_ms()
        key = keyspace.SCALING_BUDGETS
        await self._commit(key, [], [put_op(key, keyspace.encode(record))])
        return record
