"""OpenAI request bodies (chat completions, completions) read into one plain, checked `Job`.

Every field of the OpenAI API is either honoured, accepted because it changes nothing here
(`user`, `metadata`, ...), or refused with 400 naming it: a client that asks for tools, JSON mode,
penalties or top-k alternatives gets an error, never an answer that silently ignored the request.
Unknown fields are refused as OpenAI refuses them. Limits shared with the rest of the mesh
(max_tokens, stop strings, input size) are checked again by the router; this module checks the
OpenAI-specific shapes and ranges, and says which field is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from services.common.validation import ChatMessage, Priority

from .errors import BadField

#: Choices one request may ask for (prompts x n for completions).
MAX_CHOICES = 16
#: OpenAI's ranges.
MAX_TEMPERATURE = 2.0
MAX_TOP_LOGPROBS = 20
#: Completions' OpenAI default when max_tokens is absent; chat uses the mesh default (0 -> 128).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16

# service_tier -> the mesh's priority: "priority" is served first, "flex" is shed first.
_TIERS = {"auto": None, "default": None, "priority": Priority.CRITICAL, "flex": Priority.SHEDDABLE}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_COMMON = frozenset({
    "model", "stream", "stream_options", "n", "max_tokens", "temperature", "top_p", "top_k", "seed",
    "stop", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user", "service_tier",
    "prompt_cache_key", "safety_identifier", "metadata", "store"})
CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                         "functions", "function_call", "parallel_tool_calls", "response_format",
                         "modalities", "reasoning_effort"}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "suffix", "best_of"}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int  # 0: the mesh's default
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: tuple[str, ...]
    logprobs: bool


@dataclass(frozen=True)
class Job:
    """One OpenAI request: `prompts` (completions) or `messages` (chat), `n` choices of each."""

    kind: str  # "chat" or "completion"
    model: str
    sampling: Sampling
    n: int = 1
    prompts: tuple[str, ...] = ()
    messages: tuple[ChatMessage, ...] = ()
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    priority: Priority | None = None
    service_tier: str | None = None
    session_id: str = ""

    @property
    def choices(self) -> int:
        return max(1, len(self.prompts)) * self.n


def _get(body: Mapping[str, Any], key: str, kind: type | tuple[type, ...], what: str) -> Any:
    """body[key] if present and not null, checked against `kind` (bool is never an int here)."""
    value = body.get(key)
    if value is None:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise BadField(key, f"{key} must be {what}, got {type(value).__name__}")
    return value


def _number(body: Mapping[str, Any], key: str, default: float, low: float, high: float,
            low_open: bool = False) -> float:
    value = _get(body, key, (int, float), "a number")
    if value is None:
        return default
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise BadField(key, f"{key} must be in {bracket}{low:g}, {high:g}], got {value}")
    return float(value)


def _int(body: Mapping[str, Any], key: str, low: int, high: int) -> int | None:
    value = _get(body, key, int, "an integer")
    if value is not None and not low <= value <= high:
        raise BadField(key, f"{key} must be in [{low}, {high}], got {value}")
    return value


def _stop(body: Mapping[str, Any]) -> tuple[str, ...]:
    value = _get(body, "stop", (str, list), "a string or a list of strings")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not all(isinstance(s, str) for s in items):
        raise BadField("stop", "stop must be a string or a list of strings")
    return tuple(items)


def _unsupported(body: Mapping[str, Any], key: str, allowed: Callable[[Any], bool], why: str) -> None:
    if key in body and body[key] is not None and not allowed(body[key]):
        raise BadField(key, f"{key} is not supported by this server: {why}")


def _check_unsupported(body: Mapping[str, Any]) -> None:
    """Features the mesh cannot honour: refused unless given as their neutral value."""
    _unsupported(body, "presence_penalty", lambda v: v == 0, "only 0 (no penalty)")
    _unsupported(body, "frequency_penalty", lambda v: v == 0, "only 0 (no penalty)")
    _unsupported(body, "logit_bias", lambda v: v == {}, "only an empty object")
    _unsupported(body, "tools", lambda v: v == [], "the mesh does not call tools")
    _unsupported(body, "functions", lambda v: v == [], "the mesh does not call functions")
    _unsupported(body, "tool_choice", lambda v: v == "none", "only \"none\"")
    _unsupported(body, "function_call", lambda v: v == "none", "only \"none\"")
    _unsupported(body, "response_format", lambda v: v == {"type": "text"}, "only {\"type\": \"text\"}")
    _unsupported(body, "modalities", lambda v: v == ["text"], "only [\"text\"]")
    _unsupported(body, "reasoning_effort", lambda v: False, "the served models do not reason")
    _unsupported(body, "suffix", lambda v: v == "", "no insertion (suffix) mode")


def _check_fields(body: Any, allowed: frozenset[str]) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise BadField("", "the request body must be a JSON object")
    for key in body:
        if key not in allowed:
            raise BadField(str(key)[:64], f"unrecognized request argument supplied: {str(key)[:64]}")
    return body


def _model(body: Mapping[str, Any]) -> str:
    model = _get(body, "model", str, "a string")
    if not model:
        raise BadField("model", "model is required (GET /v1/models lists the served models)")
    return model


def _stream(body: Mapping[str, Any]) -> tuple[bool, bool]:
    stream = bool(_get(body, "stream", bool, "true or false"))
    options = _get(body, "stream_options", dict, "an object")
    if options is None:
        return stream, False
    if not stream:
        raise BadField("stream_options", "stream_options is only allowed when stream is true")
    unknown = set(options) - {"include_usage", "include_obfuscation"}
    if unknown:
        raise BadField("stream_options", f"unrecognized stream_options: {', '.join(sorted(map(str, unknown)))}")
    return stream, bool(_get(options, "include_usage", bool, "true or false"))


def _tier(body: Mapping[str, Any]) -> tuple[str | None, Priority | None]:
    tier = _get(body, "service_tier", str, "a string")
    if tier is not None and tier not in _TIERS:
        raise BadField("service_tier", f"service_tier must be one of {', '.join(_TIERS)}, got {tier[:32]!r}")
    return tier, (_TIERS[tier] if tier else None)


def _sampling(body: Mapping[str, Any], max_tokens: int, logprobs: bool) -> Sampling:
    seed = _get(body, "seed", int, "an integer")
    top_k = _int(body, "top_k", -1, 1 << 20)
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, MAX_TEMPERATURE),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=max(0, top_k or 0),  # -1 (vLLM's "off") and 0 both mean no top-k
        seed=None if seed is None else seed % (1 << 64),
        stop=_stop(body), logprobs=logprobs)


def _job(kind: str, body: Mapping[str, Any], sampling: Sampling, **fields: Any) -> Job:
    stream, include_usage = _stream(body)
    tier, priority = _tier(body)
    session = _get(body, "prompt_cache_key", str, "a string") or ""
    job = Job(kind=kind, model=_model(body), sampling=sampling, n=_int(body, "n", 1, MAX_CHOICES) or 1,
              stream=stream, include_usage=include_usage, priority=priority, service_tier=tier,
              session_id=session, **fields)
    if job.choices > MAX_CHOICES:
        raise BadField("n", f"prompts x n is {job.choices}; at most {MAX_CHOICES} choices per request")
    return job


def _content(i: int, message: Mapping[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BadField(f"messages[{i}].content[{j}]", "only text content parts are supported "
                                                              "({\"type\": \"text\", \"text\": ...})")
            texts.append(part["text"])
        return "".join(texts)
    raise BadField(f"messages[{i}].content", "content must be a string or a list of text parts")


def _messages(body: Mapping[str, Any]) -> tuple[ChatMessage, ...]:
    messages = _get(body, "messages", list, "a list of messages")
    if not messages:
        raise BadField("messages", "messages is required: a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadField(f"messages[{i}]", "each message must be an object with role and content")
        role = m.get("role")
        if role not in _ROLES:
            raise BadField(f"messages[{i}].role", f"role must be one of {', '.join(_ROLES)} (no tools), "
                                                  f"got {str(role)[:32]!r}")
        if m.get("tool_calls") or m.get("function_call"):
            raise BadField(f"messages[{i}]", "tool and function calls are not supported")
        out.append(ChatMessage(_ROLES[role], _content(i, m)))
    return tuple(out)


def parse_chat(body: Any) -> Job:
    """POST /v1/chat/completions."""
    body = _check_fields(body, CHAT_FIELDS)
    _check_unsupported(body)
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top:
        raise BadField("top_logprobs", "top_logprobs > 0 is not supported: the mesh returns the log-probability "
                                       "of each chosen token only (logprobs: true, top_logprobs: 0)")
    logprobs = bool(_get(body, "logprobs", bool, "true or false"))
    if top is not None and not logprobs:
        raise BadField("top_logprobs", "top_logprobs needs logprobs: true")
    max_tokens = (_int(body, "max_completion_tokens", 1, 1 << 30)
                  or _int(body, "max_tokens", 1, 1 << 30) or 0)
    return _job("chat", body, _sampling(body, max_tokens, logprobs), messages=_messages(body))


def _prompts(body: Mapping[str, Any]) -> tuple[str, ...]:
    prompt = _get(body, "prompt", (str, list), "a string or a list of strings")
    if prompt is None:
        raise BadField("prompt", "prompt is required")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not prompts:
        raise BadField("prompt", "prompt is an empty list")
    if not all(isinstance(p, str) for p in prompts):
        raise BadField("prompt", "token-id prompts are not supported: send text")
    return tuple(prompts)


def parse_completion(body: Any) -> Job:
    """POST /v1/completions (the legacy text API)."""
    body = _check_fields(body, COMPLETION_FIELDS)
    _check_unsupported(body)
    logprobs = _int(body, "logprobs", 0, 5)
    if logprobs:
        raise BadField("logprobs", "logprobs > 0 is not supported: the mesh returns the log-probability of "
                                   "each chosen token only (logprobs: 0)")
    echo = bool(_get(body, "echo", bool, "true or false"))
    if echo and logprobs is not None:
        raise BadField("echo", "echo with logprobs is not supported (no log-probabilities for prompt tokens)")
    n = _int(body, "n", 1, MAX_CHOICES) or 1
    best_of = _int(body, "best_of", 1, MAX_CHOICES)
    if best_of is not None and best_of not in (1, n):
        raise BadField("best_of", "best_of is not supported beyond n (no server-side ranking of candidates)")
    max_tokens = _int(body, "max_tokens", 1, 1 << 30) or COMPLETIONS_DEFAULT_MAX_TOKENS
    return _job("completion", body, _sampling(body, max_tokens, logprobs is not None),
                prompts=_prompts(body), echo=echo)
