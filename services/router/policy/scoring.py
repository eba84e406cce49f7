"""Stage 3b: without a session, score by cached prefix and load (the lower cost wins).

cost = uncached prompt blocks (prefill work the server must do) + load in the same unit:
each running request costs `per_running` blocks, each queued one `per_queued` blocks, and KV
pressure up to `kv_full` blocks when the cache is full. This is Dynamo's idea (uncached prefill
plus decode load), with weights in prompt blocks so that a long cached conversation outweighs a
couple of extra requests but not a deep queue.

Ties (and the common case of nothing cached anywhere) use power-of-two-choices on load: two
random candidates, the less loaded wins, which spreads load without herding every router onto
the same momentarily idle server.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

from .prefix import PrefixIndex
from .types import Endpoint, RouteRequest

E = TypeVar("E", bound=Endpoint)


@dataclass(frozen=True)
class Weights:
    per_running: float = 8.0
    per_queued: float = 16.0
    kv_full: float = 32.0


def load_cost(e: Endpoint, w: Weights) -> float:
    load = e.load()
    running = max(0, load.in_flight - load.queue_depth)
    return running * w.per_running + load.queue_depth * w.per_queued + load.kv_fraction * w.kv_full


def two_choices(tier: Sequence[E], w: Weights, rng: random.Random) -> E:
    if len(tier) == 1:
        return tier[0]
    a, b = rng.sample(list(tier), 2)
    ca, cb = load_cost(a, w), load_cost(b, w)
    if ca == cb:
        return a if rng.random() < 0.5 else b
    return a if ca < cb else b


#: Prompt tokens per cost unit: the text guess's 64-character blocks are about 16 tokens, so
#: precise (token) matches are scored on the same scale as the load weights.
TOKENS_PER_UNIT = 16.0


def choose(tier: Sequence[E], req: RouteRequest, index: PrefixIndex, w: Weights,
           rng: random.Random, precise: tuple[dict[str, float], int] | None = None) -> tuple[E, str]:
    """(endpoint, reason): reason is "prefix" when cached blocks decided, else "load".

    `precise` - tokens each replica really has cached and the prompt's tokens (KV events) -
    replaces the text guess when given."""
    if precise is not None:
        matched, total = {k: v / TOKENS_PER_UNIT for k, v in precise[0].items()}, precise[1] / TOKENS_PER_UNIT
    else:
        hashes = req.block_hashes(index.block_chars)
        matched = {e.replica_id: float(index.match(e.replica_id, hashes)) for e in tier} if hashes else {}
        total = float(len(hashes))
    if not any(matched.values()):
        return two_choices(tier, w, rng), "load"
    costs = [(total - matched[e.replica_id] + load_cost(e, w), e) for e in tier]
    best = min(c for c, _ in costs)
    top = [e for c, e in costs if c - best < 1e-9]
    chosen = top[0] if len(top) == 1 else two_choices(top, w, rng)
    return chosen, ("prefix" if matched[chosen.replica_id] else "load")
