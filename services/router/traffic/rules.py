"""Rule routing: ordered rules, the first whose every condition holds decides; else the default.

The router has no tokenizer, so prompt length in tokens is an estimate: UTF-8 bytes / 4, rounded
up (BPE vocabularies of current LLMs average 3.5-4.5 bytes per token on English text; code and
non-Latin scripts come out lower, i.e. the estimate errs long there). Regular expressions are RE2
(compiled when the record is read), searched in the prompt text, so matching is linear in it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common.traffic.records import Rule, Rules


def estimate_tokens(text: str) -> int:
    return (len(text.encode("utf-8", errors="replace")) + 3) // 4


@dataclass
class RuleInput:
    """What rules look at, computed only when a rule asks for it."""

    headers: Mapping[str, str]
    region: str
    text: str
    priority: int
    _tokens: int | None = field(default=None, repr=False)

    @property
    def tokens(self) -> int:
        if self._tokens is None:
            self._tokens = estimate_tokens(self.text)
        return self._tokens


def matches(rule: Rule, inp: RuleInput) -> bool:
    if rule.priorities and inp.priority not in rule.priorities:
        return False
    if rule.regions and inp.region not in rule.regions:
        return False
    for name, values in rule.headers:
        if inp.headers.get(name) not in values:
            return False
    if rule.min_tokens and inp.tokens < rule.min_tokens:
        return False
    if rule.max_tokens and inp.tokens > rule.max_tokens:
        return False
    return rule.regex is None or rule.regex.search(inp.text) is not None  # type: ignore[attr-defined]


def choose(rules: Rules, inp: RuleInput) -> tuple[str, str]:
    """(target, the deciding rule's name or 'default')."""
    for rule in rules.rules:
        if matches(rule, inp):
            return rule.target, rule.name
    return rules.default, "default"
