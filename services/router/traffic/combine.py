"""Ensemble combiners over whole answers: majority vote, weighted vote and best mean
log-probability (first success, hedging, is a race and lives in ensemble.py).

Votes compare normalised answers (answer_format): `text` folds case, runs of white space and
surrounding punctuation; `first_line` takes the first non-empty line, then folds it as `text`;
`number` takes the last number (as math benchmarks grade: "7 + 5 = 12" answers 12; an answer
without one never wins). Ties go to the earliest member
in the policy's order, so the outcome is deterministic for the same answers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

_SPACE = re.compile(r"\s+")
_NUMBER = re.compile(r"[-+]?\d[\d,]*(?:\.\d+)?")
_EDGE = " \t\n.,;:!?\"'`*()[]{}"


@dataclass(frozen=True)
class MemberAnswer:
    index: int  # the member's position in the policy
    text: str
    weight: float = 1.0
    logprobs: tuple[float, ...] = ()


def normalise(text: str, answer_format: str) -> str | None:
    """The comparable form of an answer, or None when it has none (no number, empty)."""
    if answer_format == "number":
        found = _NUMBER.findall(text)
        if not found:
            return None
        value = found[-1].replace(",", "").lstrip("+")
        if "." in value:
            value = value.rstrip("0").rstrip(".")
        return "0" if value in ("-0", "") else value
    if answer_format == "first_line":
        text = next((line for line in text.splitlines() if line.strip()), "")
    folded = _SPACE.sub(" ", text).strip(_EDGE).casefold()
    return folded or None


def mean_logprob(answer: MemberAnswer) -> float:
    return sum(answer.logprobs) / len(answer.logprobs) if answer.logprobs else -math.inf


def vote(answers: Sequence[MemberAnswer], answer_format: str, weighted: bool) -> MemberAnswer:
    """The earliest answer of the normalised form with the most votes (or weight). Without any
    comparable answer, the earliest answer."""
    ordered = sorted(answers, key=lambda a: a.index)
    tally: dict[str, float] = {}
    first: dict[str, MemberAnswer] = {}
    for a in ordered:
        key = normalise(a.text, answer_format)
        if key is None:
            continue
        tally[key] = tally.get(key, 0.0) + (a.weight if weighted else 1.0)
        first.setdefault(key, a)
    if not tally:
        return ordered[0]
    best = max(tally.values())
    return min((first[k] for k, v in tally.items() if v == best), key=lambda a: a.index)


def combine(answers: Sequence[MemberAnswer], combiner: str, answer_format: str) -> MemberAnswer:
    if not answers:
        raise ValueError("no answers to combine")
    if combiner == "best_mean_logprob":
        return max(sorted(answers, key=lambda a: a.index), key=mean_logprob)
    return vote(answers, answer_format, weighted=combiner == "weighted_vote")
