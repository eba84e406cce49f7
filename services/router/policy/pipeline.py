"""The policies a router can run (`--policy`), built from the stages.

meshserve   candidates -> locality -> affinity (with a session) -> prefix/load score; the prefix is
            scored on KV events where replicas publish them, else on the text guess
meshserve_text  the same, always on the text guess (a baseline for the cache benchmark)
least_load  candidates -> fewest requests in flight, random among ties (a baseline)
round_robin candidates -> the next server in turn (a baseline)

The baselines ignore locality, sessions and caches on purpose: benchmarks compare against them.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from . import affinity, candidates, locality, precise, scoring
from .kv_index import KvIndex
from .prefix import PrefixIndex
from .tokens import TokenizerCache
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

    def kv_events(self, replica_id: str, msg: Any,
                  fetch_tokenizer: Callable[[], Awaitable[Any]]) -> bool:
        """A replica's KV events (load stream); False asks for a snapshot (events were missed)."""
        return True


@dataclass
class MeshServePolicy(Policy):
    index: PrefixIndex = field(default_factory=PrefixIndex)
    weights: scoring.Weights = field(default_factory=scoring.Weights)
    rng: random.Random = field(default_factory=random.Random)
    #: What replicas really cache (KV events) and the tokenizers to key requests with.
    kv: KvIndex = field(default_factory=KvIndex)
    tokenizers: TokenizerCache = field(default_factory=TokenizerCache)
    #: False: score by the text guess even where events exist (the benchmark's baseline).
    use_events: bool = True
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
            found = precise.cached_tokens(tier, req, self.kv, self.tokenizers) if self.use_events else None
            chosen, reason = scoring.choose(tier, req, self.index, self.weights, self.rng, found)
        return Pick(chosen, "spill" if spilled else reason)

    def sent(self, replica_id: str, req: RouteRequest) -> None:
        hashes = req.block_hashes(self.index.block_chars)
        if hashes:
            self.index.record(replica_id, hashes)

    def forget(self, replica_id: str) -> None:
        self.index.forget(replica_id)
        self.kv.forget(replica_id)

    def kv_events(self, replica_id, msg, fetch_tokenizer):
        ok = self.kv.apply(replica_id, msg)
        if msg.info.tokenizer_digest:
            self.tokenizers.ensure(msg.info.tokenizer_digest, fetch_tokenizer)
        return ok


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


def _text_guess() -> Policy:
    return MeshServePolicy(use_events=False)


POLICIES: dict[str, Callable[[], Policy]] = {
    "meshserve": MeshServePolicy,
    "meshserve_text": _text_guess,
    "least_load": LeastLoadPolicy,
    "round_robin": RoundRobinPolicy,
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; choose one of "
                         f"{', '.join(POLICIES)}") from None


