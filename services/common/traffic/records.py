"""A TrafficPolicy record checked into plain, typed values - or InvalidArgument saying why not.

The control plane runs this before it writes a record, and every router runs it again on what it
reads from etcd (a record written around the API is ignored and logged, never applied), so the
rules live here once. Defaults are resolved here too: later stages never see the protocol's
0-means-default. References between policies (a target that names nothing, cycles) are graph.py's.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import re2
from meshserve.v1 import traffic_pb2 as tp

from services.common import names
from services.common.errors import InvalidArgument

MAX_TARGETS = 16
MAX_LINKS = 8
MAX_RULES = 64
MAX_MEMBERS = 8
MAX_STEPS = 20
MAX_HEADER_VALUES = 32
MAX_VALUE_CHARS = 256
MAX_REGEX_CHARS = 1024
MAX_TEMPLATE_CHARS = 4096
MAX_DESCRIPTION_CHARS = 512
MAX_STEP_S = 86_400
MAX_WINDOW_S = 3_600
MAX_FIRST_TOKEN_TIMEOUT_MS = 600_000
MAX_TOKENS_BOUND = 1 << 24
REGEX_MAX_MEM = 8 << 20
HEADER_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]{1,128}")
RESERVED_HEADERS = ("te", "content-type", "host")
PROMPT_PLACEHOLDER = "{prompt}"

DEFAULT_STEPS = (5, 25, 50, 100)
DEFAULT_STEP_S = 60
DEFAULT_MAX_ERROR_INCREASE = 0.05
DEFAULT_MAX_TTFT_INCREASE = 0.5
DEFAULT_MIN_REQUESTS = 20
DEFAULT_WINDOW_S = 30

KINDS = ("split", "canary", "fallback", "rules", "ensemble")
COMBINERS = {0: "first_success", 1: "first_success", 2: "majority", 3: "best_mean_logprob",
             4: "weighted_vote"}
FORMATS = {0: "text", 1: "text", 2: "first_line", 3: "number"}


@dataclass(frozen=True)
class Split:
    targets: tuple[tuple[str, int], ...]  # (target, percent), weights add up to 100


@dataclass(frozen=True)
class Canary:
    stable: str
    canary: str
    steps: tuple[int, ...]
    step_s: int
    max_error_increase: float
    max_ttft_increase: float
    min_requests: int
    window_s: int


@dataclass(frozen=True)
class Fallback:
    links: tuple[str, ...]
    first_token_timeout_s: float | None
    resume_across_links: bool


@dataclass(frozen=True)
class Rule:
    name: str
    target: str
    headers: tuple[tuple[str, frozenset[str]], ...] = ()
    regions: frozenset[str] = frozenset()
    min_tokens: int = 0
    max_tokens: int = 0  # 0 = no bound
    regex: object | None = None  # a compiled RE2 pattern
    priorities: frozenset[int] = frozenset()


@dataclass(frozen=True)
class Rules:
    rules: tuple[Rule, ...]
    default: str


@dataclass(frozen=True)
class Member:
    target: str
    weight: float = 1.0
    temperature: float | None = None
    seed: int | None = None
    template: str = ""


@dataclass(frozen=True)
class Ensemble:
    members: tuple[Member, ...]
    combiner: str
    quorum: int
    answer_format: str


Spec = Split | Canary | Fallback | Rules | Ensemble


@dataclass(frozen=True)
class Policy:
    name: str
    kind: str
    spec: Spec
    generation: int = 0

    def targets(self) -> tuple[str, ...]:
        """Every name this policy refers to, in order."""
        s = self.spec
        if isinstance(s, Split):
            return tuple(t for t, _ in s.targets)
        if isinstance(s, Canary):
            return (s.stable, s.canary)
        if isinstance(s, Fallback):
            return s.links
        if isinstance(s, Rules):
            return (*(r.target for r in s.rules), s.default)
        return tuple(m.target for m in s.members)


def _target(where: str, target: str) -> str:
    if not target:
        raise InvalidArgument(f"{where}: a target is required (a deployment NAME or NAME@VERSION, or "
                              "another policy's name)")
    try:
        return names.check_model_name(target)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{where}: {exc.message}") from None


def _split(s: tp.SplitPolicy) -> Split:
    if not 1 <= len(s.targets) <= MAX_TARGETS:
        raise InvalidArgument(f"split: give 1-{MAX_TARGETS} targets, got {len(s.targets)}")
    out = []
    for i, t in enumerate(s.targets):
        out.append((_target(f"split.targets[{i}]", t.target), t.weight))
    _unique("split", [t for t, _ in out])
    total = sum(w for _, w in out)
    if total != 100:
        raise InvalidArgument(f"split: weights add up to {total}; they must add up to 100 "
                              f"({', '.join(f'{t}={w}' for t, w in out)})")
    return Split(tuple(out))


def _unique(where: str, targets: list[str]) -> None:
    seen = set()
    for t in targets:
        if t in seen:
            raise InvalidArgument(f"{where}: target {t!r} is listed twice")
        seen.add(t)


def _fraction(where: str, value: float, default: float, high: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= high:
        raise InvalidArgument(f"{where} must be a number in [0, {high:g}] (0 = default {default:g}), "
                              f"got {value}")
    return value or default


def _canary(c: tp.CanaryPolicy) -> Canary:
    stable, canary = _target("canary.stable", c.stable), _target("canary.canary", c.canary)
    if stable == canary:
        raise InvalidArgument(f"canary: stable and canary are both {stable!r}")
    steps = tuple(c.steps) or DEFAULT_STEPS
    if len(steps) > MAX_STEPS:
        raise InvalidArgument(f"canary: at most {MAX_STEPS} steps, got {len(steps)}")
    if any(not 1 <= s <= 100 for s in steps) or any(a >= b for a, b in zip(steps, steps[1:], strict=False)):
        raise InvalidArgument(f"canary.steps must increase, each a percent in [1, 100], got "
                              f"{', '.join(map(str, steps))}")
    if c.step_seconds > MAX_STEP_S or c.window_seconds > MAX_WINDOW_S:
        raise InvalidArgument(f"canary: step_seconds must be <= {MAX_STEP_S} and window_seconds <= "
                              f"{MAX_WINDOW_S}")
    if c.min_requests > 1_000_000:
        raise InvalidArgument("canary.min_requests must be <= 1000000")
    return Canary(stable, canary, steps, c.step_seconds or DEFAULT_STEP_S,
                  _fraction("canary.max_error_rate_increase", c.max_error_rate_increase,
                            DEFAULT_MAX_ERROR_INCREASE, 1.0),
                  _fraction("canary.max_ttft_p95_increase", c.max_ttft_p95_increase,
                            DEFAULT_MAX_TTFT_INCREASE, 100.0),
                  c.min_requests or DEFAULT_MIN_REQUESTS, c.window_seconds or DEFAULT_WINDOW_S)


def _fallback(f: tp.FallbackPolicy) -> Fallback:
    if not 2 <= len(f.links) <= MAX_LINKS:
        raise InvalidArgument(f"fallback: give 2-{MAX_LINKS} links (primary first), got {len(f.links)}")
    links = tuple(_target(f"fallback.links[{i}]", t) for i, t in enumerate(f.links))
    _unique("fallback", list(links))
    if f.first_token_timeout_ms > MAX_FIRST_TOKEN_TIMEOUT_MS:
        raise InvalidArgument(f"fallback.first_token_timeout_ms must be <= {MAX_FIRST_TOKEN_TIMEOUT_MS}")
    timeout = f.first_token_timeout_ms / 1000 if f.first_token_timeout_ms else None
    return Fallback(links, timeout, f.resume_across_links)


def compile_regex(where: str, pattern: str) -> object:
    """An RE2 pattern: matching takes linear time, so no prompt can stall a router."""
    if len(pattern) > MAX_REGEX_CHARS:
        raise InvalidArgument(f"{where}: the pattern is {len(pattern)} characters; at most {MAX_REGEX_CHARS}")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = REGEX_MAX_MEM
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        detail = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise InvalidArgument(f"{where}: {pattern[:80]!r} is not a valid RE2 regular expression "
                              f"({detail[:160]}; RE2 has no backreferences or lookaround)") from None


def _headers(where: str, matches) -> tuple[tuple[str, frozenset[str]], ...]:
    out = []
    for h in matches:
        if not HEADER_TOKEN.fullmatch(h.name) or h.name.startswith("grpc-") or h.name in RESERVED_HEADERS:
            raise InvalidArgument(f"{where}: header {h.name[:80]!r} must be a lower-case HTTP header "
                                  "name (not grpc-*, te, content-type or host)")
        if not 1 <= len(h.values) <= MAX_HEADER_VALUES:
            raise InvalidArgument(f"{where}: header {h.name} needs 1-{MAX_HEADER_VALUES} values")
        if any(len(v) > MAX_VALUE_CHARS or not v.isprintable() for v in h.values):
            raise InvalidArgument(f"{where}: header {h.name} values must be printable, at most "
                                  f"{MAX_VALUE_CHARS} characters")
        out.append((h.name, frozenset(h.values)))
    return tuple(out)


def _rule(i: int, r: tp.RoutingRule) -> Rule:
    where = f"rules[{i}]" + (f" ({r.name[:40]})" if r.name else "")
    if len(r.name) > 64 or not r.name.isprintable():
        raise InvalidArgument(f"{where}: the name must be printable, at most 64 characters")
    for region in r.regions:
        names.check_name(f"{where}: region", region)
    if r.max_prompt_tokens and r.min_prompt_tokens > r.max_prompt_tokens:
        raise InvalidArgument(f"{where}: min_prompt_tokens {r.min_prompt_tokens} > max_prompt_tokens "
                              f"{r.max_prompt_tokens}")
    if max(r.min_prompt_tokens, r.max_prompt_tokens) > MAX_TOKENS_BOUND:
        raise InvalidArgument(f"{where}: prompt token bounds must be <= {MAX_TOKENS_BOUND}")
    priorities = frozenset(int(p) for p in r.priorities)
    if not priorities <= {1, 2, 3}:
        raise InvalidArgument(f"{where}: priorities must be CRITICAL, STANDARD or SHEDDABLE")
    return Rule(name=r.name or f"#{i}", target=_target(f"{where}.target", r.target),
                headers=_headers(where, r.headers), regions=frozenset(r.regions),
                min_tokens=r.min_prompt_tokens, max_tokens=r.max_prompt_tokens,
                regex=compile_regex(f"{where}.prompt_regex", r.prompt_regex) if r.prompt_regex else None,
                priorities=priorities)


def _rules(r: tp.RulesPolicy) -> Rules:
    if len(r.rules) > MAX_RULES:
        raise InvalidArgument(f"rules: at most {MAX_RULES} rules, got {len(r.rules)}")
    rules = tuple(_rule(i, x) for i, x in enumerate(r.rules))
    return Rules(rules, _target("rules.default_target", r.default_target))


def _member(i: int, m: tp.EnsembleMember) -> Member:
    where = f"ensemble.members[{i}]"
    if not math.isfinite(m.weight) or not 0 <= m.weight <= 1000:
        raise InvalidArgument(f"{where}.weight must be in [0, 1000] (0 = 1), got {m.weight}")
    temperature = m.temperature if m.HasField("temperature") else None
    if temperature is not None and not (math.isfinite(temperature) and 0 <= temperature <= 100):
        raise InvalidArgument(f"{where}.temperature must be in [0, 100], got {temperature}")
    template = m.prompt_template
    if template and (PROMPT_PLACEHOLDER not in template or len(template) > MAX_TEMPLATE_CHARS):
        raise InvalidArgument(f"{where}.prompt_template must contain {PROMPT_PLACEHOLDER} and be at "
                              f"most {MAX_TEMPLATE_CHARS} characters")
    return Member(_target(f"{where}.target", m.target), m.weight or 1.0, temperature,
                  m.seed if m.HasField("seed") else None, template)


def _ensemble(e: tp.EnsemblePolicy) -> Ensemble:
    if not 1 <= len(e.members) <= MAX_MEMBERS:
        raise InvalidArgument(f"ensemble: give 1-{MAX_MEMBERS} members, got {len(e.members)}")
    if e.combiner not in COMBINERS or e.answer_format not in FORMATS:
        raise InvalidArgument("ensemble: unknown combiner or answer_format")
    quorum = e.quorum or 1
    if quorum > len(e.members):
        raise InvalidArgument(f"ensemble.quorum {quorum} is more than its {len(e.members)} members")
    return Ensemble(tuple(_member(i, m) for i, m in enumerate(e.members)), COMBINERS[e.combiner],
                    quorum, FORMATS[e.answer_format])


_PARSERS: dict[str, Callable[[Any], Spec]] = {
    "split": _split, "canary": _canary, "fallback": _fallback, "rules": _rules, "ensemble": _ensemble}


def parse(msg: tp.TrafficPolicy) -> Policy:
    """The record as plain values, or InvalidArgument naming the field and the rule."""
    try:
        names.check_name("traffic policy name", msg.name)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{exc.message} (a policy is the name clients ask for; versions "
                              "NAME@VERSION are deployments)") from None
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise InvalidArgument(f"policy {msg.name!r} has no kind: give one of {', '.join(KINDS)}")
    if len(msg.description) > MAX_DESCRIPTION_CHARS:
        raise InvalidArgument(f"description: at most {MAX_DESCRIPTION_CHARS} characters")
    spec = _PARSERS[kind](getattr(msg, kind))
    return Policy(msg.name, kind, spec, msg.generation)


def canary_weight(canary: Canary, phase: int, step: int) -> int:
    """The canary's percent for a state (no state yet: the first step)."""
    if phase == tp.CANARY_PHASE_ROLLED_BACK:
        return 0
    if phase == tp.CANARY_PHASE_PROMOTED:
        return 100
    return canary.steps[min(step, len(canary.steps) - 1)]
