"""How names refer to each other: which name is a policy, a deployment or a version alias, which
targets name nothing, and which policies form a cycle.

A name resolves, in this order, to: the traffic policy of that name; the deployment of that name
(deployed, or pinned on a server); or, when `NAME@VERSION` deployments exist and neither of the
others, the implicit alias NAME (the oldest such version with a READY replica; the router's
table.py). The control plane refuses a write that leaves a target naming nothing or closes a
cycle (FAILED_PRECONDITION naming it); routers run `cyclic` on what they read and ignore what it
returns, so two concurrent writes can never make a router loop.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from services.common import names
from services.common.errors import FailedPrecondition

from .records import Policy

#: Policies a request may pass through (a rule to a split to a fallback ...), cycles apart.
MAX_DEPTH = 8


def aliases(deployments: Collection[str]) -> set[str]:
    """Names that versioned deployments give an implicit alias."""
    return {names.split_version(d)[0] for d in deployments if names.VERSION_SEPARATOR in d}


def exists(target: str, policies: Mapping[str, Policy], deployments: Collection[str]) -> bool:
    return target in policies or target in deployments or target in aliases(deployments)


def dangling(policy: Policy, policies: Mapping[str, Policy], deployments: Collection[str]) -> list[str]:
    """Targets of `policy` that name nothing."""
    return [t for t in policy.targets() if not exists(t, policies, deployments)]


def cycle_through(start: str, policies: Mapping[str, Policy]) -> list[str]:
    """A cycle of policy names that `start` reaches (first name repeated at the end), or []."""
    path: list[str] = []
    on_path: set[str] = set()
    done: set[str] = set()

    def visit(name: str) -> list[str]:
        if name in on_path:
            return [*path[path.index(name):], name]
        if name in done or name not in policies:
            return []
        path.append(name)
        on_path.add(name)
        for target in policies[name].targets():
            found = visit(target)
            if found:
                return found
        path.pop()
        on_path.discard(name)
        done.add(name)
        return []
    return visit(start)


def depth(start: str, policies: Mapping[str, Policy], seen: frozenset[str] = frozenset()) -> int:
    """Policies on the longest path from `start` (cycles must have been ruled out)."""
    policy = policies.get(start)
    if policy is None or start in seen:
        return 0
    return 1 + max((depth(t, policies, seen | {start}) for t in policy.targets()), default=0)


def cyclic(policies: Mapping[str, Policy]) -> set[str]:
    """Every policy on a cycle or too deep: a router must not apply them."""
    bad: set[str] = set()
    for name in policies:
        bad.update(cycle_through(name, policies))
    ok = {n: p for n, p in policies.items() if n not in bad}
    bad.update(n for n in ok if depth(n, ok) > MAX_DEPTH)
    return bad


def check_write(policy: Policy, policies: Mapping[str, Policy], deployments: Collection[str]) -> None:
    """Whether `policy` may be written next to the stored `policies` (FailedPrecondition if not)."""
    if policy.name in deployments:
        raise FailedPrecondition(f"{policy.name!r} is a deployment's name; a policy needs a name of its "
                                 f"own (deploy versions as {policy.name}@VERSION to put a policy on "
                                 f"{policy.name!r})")
    after = {**policies, policy.name: policy}
    missing = dangling(policy, after, deployments)
    if missing:
        known = ", ".join(sorted(set(deployments) | set(after))[:20]) or "none"
        raise FailedPrecondition(f"policy {policy.name!r}: target {missing[0]!r} names no deployment, "
                                 f"version alias or policy (known: {known})")
    loop = cycle_through(policy.name, after)
    if loop:
        raise FailedPrecondition(f"policy {policy.name!r} would close a cycle: {' -> '.join(loop)}")
    if depth(policy.name, after) > MAX_DEPTH:
        raise FailedPrecondition(f"policy {policy.name!r} would nest more than {MAX_DEPTH} policies deep")
    for name, other in policies.items():
        if name != policy.name and policy.name in other.targets() and depth(name, after) > MAX_DEPTH:
            raise FailedPrecondition(f"policy {name!r} would nest more than {MAX_DEPTH} policies deep")


def referrers(name: str, policies: Mapping[str, Policy], deployments: Collection[str] = ()) -> list[str]:
    """Policies that would be left with a target naming nothing without `name`: those naming it,
    and, when it is the last version of an alias, those naming the alias."""
    others = [d for d in deployments if d != name]
    gone = {name}
    base = names.split_version(name)[0]
    if base != name and not exists(base, policies, others):
        gone.add(base)
    return sorted(p.name for p in policies.values() if p.name != name and gone & set(p.targets()))
