"""The policies a router can run (`--policy`), built from the stages.

meshserve   candidates -> locality -> affinity (with a session) -> prefix/load score
least_load  candidates -> fewest requests in flight, random among ties (a baseline)
round_robin candidates -> the next server in turn (a baseline)

The baselines ignore locality, sessions and caches on purpose: benchmarks compare against them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from . import affinity, candidates, locality, scoring
from .prefix import PrefixIndex
from .types import Endpoint, RouteRequest, Settings

E = TypeVar("E", bound=Endpoint)


@dataclass(frozen=True)
class Pick(Generic[E]):
    endpoint: E
    reason: str  # metrics label: affinity, prefix, load, spill, least_load, round_robin


class Policy:
    """Chooses one endpoint per attempt; `sent` tells it where a request went."""

    name = ""
    #: Whether `pick` or `sent` reads RouteRequest.text (the rendered prompt); when not, the
    #: router skips rendering it.
    uses_text = False

    def pick(self, endpoints: Sequence[E], req: RouteRequest, settings: Settings,
             exclude: set[str] | frozenset[str] = frozenset()) -> Pick[E] | None:
        raise NotImplementedError

    def sent(self, replica_id: str, req: RouteRequest) -> None:
        """Called once the request was issued to the replica `replica_id`."""

    def forget(self, replica_id: str) -> None:
        """Called when a replica left (its server, or the model on it)."""


@dataclass
class MeshServePolicy(Policy):
    index: PrefixIndex = field(default_factory=PrefixIndex)
    weights: scoring.Weights = field(default_factory=scoring.Weights)
    rng: random.Random = field(default_factory=random.Random)
    name = "meshserve"
    uses_text = True

    def pick(self, endpoints, req, settings, exclude=frozenset()):
        usable = candidates.usable(endpoints, exclude)
        if not usable:
            return None
        tier, spilled = locality.select(usable, req, settings)
        chosen = affinity.choose(tier, req.session, settings) if req.session else None
        if chosen is not None:
            reason = "affinity"
        else:
            chosen, reason = scoring.choose(tier, req, self.index, self.weights, self.rng)
        return Pick(chosen, "spill" if spilled else reason)

    def sent(self, replica_id: str, req: RouteRequest) -> None:
        hashes = req.block_hashes(self.index.block_chars)
        if hashes:
            self.index.record(replica_id, hashes)

    def forget(self, replica_id: str) -> None:
        self.index.forget(replica_id)


@dataclass
class LeastLoadPolicy(Policy):
    rng: random.Random = field(default_factory=random.Random)
    name = "least_load"

    def pick(self, endpoints, req, settings, exclude=frozenset()):
        usable = candidates.usable(endpoints, exclude)
        if not usable:
            return None
        loads = [(e.load().in_flight, e) for e in usable]
        least = min(n for n, _ in loads)
        return Pick(self.rng.choice([e for n, e in loads if n == least]), "least_load")


@dataclass
class RoundRobinPolicy(Policy):
    counter: itertools.count[int] = field(default_factory=itertools.count)
    name = "round_robin"

    def pick(self, endpoints, req, settings, exclude=frozenset()):
        usable = sorted(candidates.usable(endpoints, exclude), key=lambda e: e.server_id)
        if not usable:
            return None
        return Pick(usable[next(self.counter) % len(usable)], "round_robin")


POLICIES: dict[str, Callable[[], Policy]] = {
    "meshserve": MeshServePolicy,
    "least_load": LeastLoadPolicy,
    "round_robin": RoundRobinPolicy,
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of "
                         f"{', '.join(POLICIES)}") from None


