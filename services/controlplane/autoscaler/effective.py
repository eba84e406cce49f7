"""Which replica count placement aims for, per model: the autoscaler's where its policy is
enabled, the deployed count elsewhere. Read from the view alone, so every control-plane replica
plans alike (ListDeployments on a follower shows what the leader places)."""

from __future__ import annotations

from meshserve.v1 import autoscale_pb2 as asp

from services.common.membership import MeshView

from .policy import Policy, stored_policy


def enabled_policies(view: MeshView) -> dict[str, Policy]:
    """Valid, enabled policies of deployed models."""
    out = {}
    for name, record in view.autoscale_policies.items():
        if name not in view.models:
            continue
        policy, _ = stored_policy(name, record)
        if policy is not None and policy.enabled:
            out[name] = policy
    return out


def clamp(policy: Policy, replicas: int) -> int:
    return max(policy.min_replicas, min(policy.max_replicas, replicas))


def starting_replicas(policy: Policy, deployed: int) -> int:
    """Before the leader's first decision: the deployed count within the policy's bounds."""
    return clamp(policy, max(deployed, policy.floor))


def stored_desired(policy: Policy, state: asp.AutoscaleState | None, deployed: int) -> int:
    if state is None or state.model != policy.model or state.desired_replicas < 0:
        return starting_replicas(policy, deployed)
    return clamp(policy, state.desired_replicas)


def effective_replicas(view: MeshView) -> dict[str, int]:
    """model -> replicas, for models whose autoscale policy is enabled."""
    return {name: stored_desired(policy, view.autoscale_states.get(name), view.models[name].replicas)
            for name, policy in enabled_policies(view).items()}
