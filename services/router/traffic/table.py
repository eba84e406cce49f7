"""The traffic records a router applies, read from its etcd view and checked again.

A record that does not parse, or that forms a cycle or nests too deep with others, is ignored and
logged (once per record version): the control plane refuses such writes, but a record written
around it, or two concurrent writes, must never make a router misroute or loop. Names resolve
as services/common/traffic/graph.py says; an alias (NAME with NAME@VERSION deployments and no
policy) goes to its oldest version that has a READY replica.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.v1 import traffic_pb2 as tp

from services.common import names
from services.common.errors import InvalidArgument
from services.common.membership import MeshView
from services.common.traffic import graph, records
from services.common.traffic.records import Canary, Policy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CanaryView:
    """A canary as routers apply it now."""

    weight: int  # percent to the canary
    generation: int
    step: int
    phase: int


class TrafficTable:
    def __init__(self, view: MeshView) -> None:
        self._view = view
        self._dirty = True
        self._parsed: dict[str, tuple[tp.TrafficPolicy, Policy | None]] = {}
        self._policies: dict[str, Policy] = {}
        self._versions: dict[str, list[str]] = {}
        self._deployments: frozenset[str] = frozenset()
        self._names: frozenset[str] = frozenset()
        self._logged: set[tuple[str, int, str]] = set()
        view.subscribe(self._changed)

    def _changed(self) -> None:
        self._dirty = True

    def _refresh(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        view = self._view
        parsed: dict[str, Policy] = {}
        for name, msg in view.traffic_policies.items():
            cached = self._parsed.get(name)
            if cached is None or cached[0] is not msg:
                cached = self._parsed[name] = (msg, self._parse(name, msg))
            if cached[1] is not None:
                parsed[name] = cached[1]
        for name in set(self._parsed) - set(view.traffic_policies):
            del self._parsed[name]
        for name in graph.cyclic(parsed):
            self._complain(name, parsed[name].generation, "it is part of a cycle of policies or nests "
                           f"more than {graph.MAX_DEPTH} deep")
            del parsed[name]
        self._policies = parsed
        self._deployments = frozenset(view.known_models())
        self._versions = self._index_versions()
        self._names = frozenset(parsed) | {a for a in self._versions if a not in self._deployments}

    def _parse(self, name: str, msg: tp.TrafficPolicy) -> Policy | None:
        try:
            policy = records.parse(msg)
        except InvalidArgument as exc:
            self._complain(name, msg.generation, exc.message)
            return None
        if policy.name != name:
            self._complain(name, msg.generation, f"the record names policy {policy.name!r}")
            return None
        return policy

    def _complain(self, name: str, generation: int, why: str) -> None:
        key = (name, generation, why)
        if key not in self._logged:
            self._logged.add(key)
            log.error("ignoring traffic policy %r (generation %d): %s", name[:128], generation, why)

    def _index_versions(self) -> dict[str, list[str]]:
        """alias -> its versions, oldest deployment first (pinned ones, with no spec, first)."""
        out: dict[str, list[tuple[int, str]]] = {}
        for model in self._deployments:
            base, version = names.split_version(model)
            if version:
                spec = self._view.models.get(model)
                out.setdefault(base, []).append((spec.created_ms if spec is not None else 0, model))
        return {base: [m for _, m in sorted(found)] for base, found in out.items()}

    # --- lookups ------------------------------------------------------------------------------

    def policy(self, name: str) -> Policy | None:
        self._refresh()
        return self._policies.get(name)

    def policies(self) -> dict[str, Policy]:
        self._refresh()
        return self._policies

    def handles(self, name: str) -> bool:
        """Whether the name goes through traffic policy (a policy or an implicit alias)."""
        self._refresh()
        return name in self._policies or (name not in self._deployments and name in self._versions)

    def names(self) -> frozenset[str]:
        """Names that policies and version aliases answer to (the same object until a change)."""
        self._refresh()
        return self._names

    def concrete(self, name: str, available: Callable[[str], bool]) -> str:
        """The deployment a non-policy name stands for: itself, or an alias's oldest available
        version (its oldest at all when none is available: that one then says why)."""
        self._refresh()
        if name in self._deployments or name not in self._versions:
            return name
        versions = self._versions[name]
        return next((v for v in versions if available(v)), versions[0])

    def versions(self, name: str) -> list[str]:
        self._refresh()
        return [] if name in self._deployments else self._versions.get(name, [])

    def canary(self, policy: Policy) -> CanaryView:
        """The canary's weight from the leader's state; a state of an older generation of the
        policy (rewritten since) does not count: the first step then."""
        assert isinstance(policy.spec, Canary)
        state = self._view.canary_states.get(policy.name)
        if state is None or state.generation != policy.generation:
            return CanaryView(policy.spec.steps[0], policy.generation, 0, tp.CANARY_PHASE_PROGRESSING)
        step = min(state.step, len(policy.spec.steps) - 1)
        return CanaryView(records.canary_weight(policy.spec, state.phase, step), policy.generation, step,
                          state.phase)
