"""Choosing one target of a split by weight: random without a session; with one, weighted
rendezvous hashing, so every router sends a session to the same target and changing weights
moves only the sessions it must (raising the canary's share moves sessions from stable to canary,
never back)."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence


def _unit(key: str, target: str) -> float:
    """A hash of (key, target) as a float in (0, 1)."""
    digest = hashlib.blake2b(f"{key}\x00{target}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "big") + 1) / (2**64 + 2)


def pick(options: Sequence[tuple[str, float]], session: str = "", rng: random.Random | None = None) -> str | None:
    """One target from (target, weight) pairs; weights <= 0 never win. None when none can."""
    live = [(t, w) for t, w in options if w > 0]
    if not live:
        return None
    if session:
        return max(live, key=lambda tw: -tw[1] / math.log(_unit(session, tw[0])))[0]
    total = sum(w for _, w in live)
    point = (rng or random).random() * total
    for target, weight in live:
        point -= weight
        if point < 0:
            return target
    return live[-1][0]
