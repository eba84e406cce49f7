"""Exact answers of the sim engine, and the check that finds lost, duplicated or reordered tokens.

The sim engine's output token i is words[i % len(words)] of the prompt, with id 1 + crc32(word) %
31999 (services/modelserver/engine/sim.py). A prompt of n words whose ids are all distinct makes
every position of an n-token answer carry its own id, so the received ids alone tell which
position each token is: a missing id is a lost token, a repeated one a duplicate, and ids out of
order show a reordering - no alignment guesswork.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

SIM_VOCAB = 32000  # the sim engine's vocabulary (ids 1..31999)


def sim_token_id(word: str) -> int:
    return 1 + zlib.crc32(word.encode()) % (SIM_VOCAB - 1)


@dataclass(frozen=True)
class Expected:
    """What the sim engine must answer to `prompt` with `max_tokens` = len(token_ids)."""

    prompt: str
    token_ids: tuple[int, ...]
    text: str


def expected_answer(tag: str, n: int) -> Expected:
    """A prompt of n words with pairwise distinct token ids (words whose id collides with an
    earlier one are skipped), and its exact n-token answer."""
    if not 1 <= n < SIM_VOCAB // 4:
        raise ValueError(f"n must be in [1, {SIM_VOCAB // 4}), got {n}")
    words: list[str] = []
    ids: list[int] = []
    seen: set[int] = set()
    k = 0
    while len(words) < n:
        word = f"{tag}w{k}"
        k += 1
        tid = sim_token_id(word)
        if tid not in seen:
            seen.add(tid)
            words.append(word)
            ids.append(tid)
    return Expected(" ".join(words), tuple(ids), " ".join(words))


@dataclass(frozen=True)
class TokenCheck:
    """How a received answer differs from the expected one (all zero and text_ok: exact)."""

    received: int
    lost: int  # expected positions never received (for an unfinished answer: gaps only)
    duplicated: int  # receptions beyond the first of a position
    reordered: int  # tokens out of place (received minus the longest in-order run)
    foreign: int  # ids that belong to no position of the answer
    text_ok: bool

    @property
    def exact(self) -> bool:
        return not (self.lost or self.duplicated or self.reordered or self.foreign) and self.text_ok


def _longest_increasing(seq: Sequence[int]) -> int:
    """Length of the longest strictly increasing subsequence (patience sorting)."""
    import bisect

    tails: list[int] = []
    for x in seq:
        i = bisect.bisect_left(tails, x)
        if i == len(tails):
            tails.append(x)
        else:
            tails[i] = x
    return len(tails)


def check_tokens(expected: Expected, received: Sequence[int], text: str, finished: bool) -> TokenCheck:
    """Compare what a client received with the exact answer. A finished answer must be whole;
    an unfinished one (failed, or cut off) is judged only up to the furthest position it reached,
    so its missing tail counts as the request's failure, not as lost tokens."""
    position = {tid: i for i, tid in enumerate(expected.token_ids)}
    if len(position) != len(expected.token_ids):
        raise ValueError("expected token ids must be pairwise distinct")
    positions = [position[t] for t in received if t in position]
    foreign = len(received) - len(positions)
    counts = Counter(positions)
    duplicated = sum(c - 1 for c in counts.values())
    reach = len(expected.token_ids) if finished else (max(positions) + 1 if positions else 0)
    lost = reach - len(counts)
    first_seen = list(dict.fromkeys(positions))
    reordered = len(first_seen) - _longest_increasing(first_seen)
    want = expected.text if finished else expected.text[:len(text)]
    return TokenCheck(len(received), lost, duplicated, reordered, foreign, text == want)
