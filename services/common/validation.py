"""Every limit on a generate request, checked in one place.

A request is validated once where it enters a process (router: InferenceService and KServe; model
server: ModelServerService) into plain, typed values - `ValidRequest` with `SamplingParams` - and
later stages take only those. The value types check themselves when built, so an unchecked one
cannot exist: the engine's own request type (engine/base.py) runs the same checks. Every failure
is `InvalidArgument` (INVALID_ARGUMENT) with a message a person can act on; the messages name the
request fields, which KServe clients also know by these names (max_tokens, temperature, ...).
"""

from __future__ import annotations

import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidArgument

#: Prompt plus message text, in characters. Far below gRPC's message limit so that an oversize
#: request gets INVALID_ARGUMENT with this explanation rather than a transport error.
MAX_INPUT_CHARS = 512 * 1024
MAX_MESSAGES = 1024
MAX_TOKENS_LIMIT = 65_536
DEFAULT_MAX_TOKENS = 128
#: Above this the distribution is uniform for any model; larger values are a client bug.
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOKEN_ID = (1 << 31) - 1
MAX_ID_CHARS = 128
MAX_SESSION_CHARS = 256
ROLES = ("system", "user", "assistant")
#: Engine backends a model can run on (services/modelserver/engine knows how to build each).
BACKENDS = ("sim", "torch", "tensorrt_llm")

_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_TENANT_CHARS = 128
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class Priority(enum.IntEnum):
    """Lower value is more important; matches meshserve.v1.Priority numbering (0 = STANDARD)."""

    CRITICAL = 1
    STANDARD = 2
    SHEDDABLE = 3


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass(frozen=True)
class SamplingParams:
    """Sampling settings with every default resolved (never the protocol's 0 = default)."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # 1 = no nucleus filtering
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check_sampling(self)


def check_sampling(s: SamplingParams) -> None:
    if not 1 <= s.max_tokens <= MAX_TOKENS_LIMIT:
        raise InvalidArgument(f"max_tokens must be in [1, {MAX_TOKENS_LIMIT}] (0 in a request means the "
                              f"default {DEFAULT_MAX_TOKENS}), got {s.max_tokens}")
    if not (math.isfinite(s.temperature) and 0.0 <= s.temperature <= MAX_TEMPERATURE):
        raise InvalidArgument(f"temperature must be a number in [0, {MAX_TEMPERATURE:g}] (0 = greedy), "
                              f"got {s.temperature}")
    if not (math.isfinite(s.top_p) and 0.0 < s.top_p <= 1.0):
        raise InvalidArgument(f"top_p must be in (0, 1] (0 in a request means 1 = no nucleus filtering), "
                              f"got {s.top_p}")
    if not 0 <= s.top_k <= MAX_TOP_K:
        raise InvalidArgument(f"top_k must be in [0, {MAX_TOP_K}] (0 = disabled), got {s.top_k}")
    if s.seed is not None and not 0 <= s.seed < 1 << 64:
        raise InvalidArgument(f"seed must be an unsigned 64-bit integer, got {s.seed}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    for i, text in enumerate(s.stop):
        if not text or len(text) > MAX_STOP_CHARS:
            raise InvalidArgument(f"stop[{i}] must be 1-{MAX_STOP_CHARS} characters, got {len(text)}")
    if len(s.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise InvalidArgument(f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids, got {len(s.stop_token_ids)}")
    if any(not 0 <= t <= MAX_TOKEN_ID for t in s.stop_token_ids):
        raise InvalidArgument("stop_token_ids must be token ids >= 0")


def check_content(prompt: str | None, messages: Sequence[ChatMessage] | None) -> None:
    """Exactly one of a prompt or chat messages, within the size limits."""
    has_prompt, has_messages = bool(prompt), bool(messages)
    if not has_prompt and not has_messages:
        raise InvalidArgument("the request is empty: give a prompt or chat messages")
    if has_prompt and has_messages:
        raise InvalidArgument("give either prompt or messages, not both")
    msgs = messages or ()
    if len(msgs) > MAX_MESSAGES:
        raise InvalidArgument(f"at most {MAX_MESSAGES} messages, got {len(msgs)}")
    size = len(prompt or "") + sum(len(m.content) for m in msgs)
    if size > MAX_INPUT_CHARS:
        raise InvalidArgument(f"input is {size} characters; the limit is {MAX_INPUT_CHARS}")
    for i, m in enumerate(msgs):
        if m.role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r:.40}")
        if not m.content:
            raise InvalidArgument(f"messages[{i}].content is empty")


def check_resume(resume_token_ids: Sequence[int], max_tokens: int) -> None:
    """Tokens a client (or an earlier attempt) already has; the answer continues after them."""
    if len(resume_token_ids) >= max_tokens:
        raise InvalidArgument(f"resume_token_ids ({len(resume_token_ids)}) already reach max_tokens "
                              f"({max_tokens}): nothing is left to generate")
    if any(not 0 <= t <= MAX_TOKEN_ID for t in resume_token_ids):
        raise InvalidArgument("resume_token_ids must be token ids >= 0")


def check_model_name(name: str) -> str:
    """A name (an alias or a deployment) or a pinned version, NAME@VERSION."""
    if not name:
        raise InvalidArgument("model is required (ListModels shows what is served)")
    base, sep, version = name.partition("@")
    if not _MODEL_NAME.fullmatch(base) or (sep and not _VERSION.fullmatch(version)):
        raise InvalidArgument(f"model {name[:64]!r} is not a valid model name: 1-128 letters, digits, "
                              "'.', '_' or '-', starting with a letter or digit, optionally followed "
                              "by @VERSION (1-64 of the same)")
    return name


def _check_token(what: str, value: str, limit: int) -> str:
    """Ids that end up in logs, metadata and hashes: bounded, printable ASCII."""
    if len(value) > limit:
        raise InvalidArgument(f"{what} is {len(value)} characters; the limit is {limit}")
    if value and not (value.isascii() and value.isprintable()):
        raise InvalidArgument(f"{what} must be printable ASCII without control characters")
    return value


@dataclass(frozen=True)
class ValidRequest:
    """A generate request every later stage can trust."""

    model: str
    prompt: str | None = None
    messages: tuple[ChatMessage, ...] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: Priority = Priority.STANDARD
    request_id: str = ""
    session_id: str = ""
    region: str = ""
    #: Tokens already produced (a client's resume, or an earlier attempt's before a migration).
    resume_token_ids: tuple[int, ...] = ()
    #: Whose cache the request shares (KV blocks and answers are salted with it); '' = anonymous.
    tenant: str = ""
    #: The leading system message(s) go under the public salt, shared with tenants that opt in.
    share_system_prompt: bool = False
    bypass_response_cache: bool = False

    def __post_init__(self) -> None:
        check_model_name(self.model)
        check_tenant(self.tenant)
        if self.share_system_prompt and not self.messages:
            raise InvalidArgument("share_system_prompt needs messages with a leading system message")
        check_content(self.prompt, self.messages)
        check_resume(self.resume_token_ids, self.sampling.max_tokens)
        _check_token("request_id", self.request_id, MAX_ID_CHARS)
        _check_token("session_id", self.session_id, MAX_SESSION_CHARS)
        if self.region and not _REGION.fullmatch(self.region):
            raise InvalidArgument(f"region {self.region[:64]!r} is not a region name (letters, digits, "
                                  "'.', '_' or '-')")


def check_tenant(tenant: str) -> str:
    """A tenant is a name: letters, digits and `._-`, at most 128 characters ('' = anonymous)."""
    if tenant and not _TENANT.fullmatch(tenant):
        raise InvalidArgument(f"tenant {tenant[:64]!r} is not a tenant name (letters, digits, '.', '_' or '-', "
                              f"at most {MAX_TENANT_CHARS} characters)")
    return tenant


# --- from the wire ------------------------------------------------------------------------------


def sampling_from_proto(s: Any) -> SamplingParams:
    """meshserve.v1.SamplingParams -> SamplingParams, resolving the protocol's zero defaults."""
    if s.max_tokens < 0:
        raise InvalidArgument(f"max_tokens must be >= 0 (0 = default {DEFAULT_MAX_TOKENS}), got {s.max_tokens}")
    if math.isnan(s.top_p) or s.top_p < 0:
        raise InvalidArgument(f"top_p must be in [0, 1] (0 = no nucleus filtering), got {s.top_p}")
    return SamplingParams(
        max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS, temperature=s.temperature, top_p=s.top_p or 1.0,
        top_k=s.top_k, seed=s.seed if s.HasField("seed") else None, stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids), logprobs=s.logprobs)


def priority_from_proto(value: int) -> Priority:
    if value == 0:
        return Priority.STANDARD
    try:
        return Priority(value)
    except ValueError:
        raise InvalidArgument(f"unknown priority {value}; use CRITICAL, STANDARD or SHEDDABLE") from None


def validate_request(msg: Any) -> ValidRequest:
    """A public GenerateRequest or an internal ModelServerServiceGenerateRequest, checked.

    Fields the message type does not have (session_id and region on the internal request) are
    left empty.
    """
    messages = tuple(ChatMessage(m.role, m.content) for m in msg.messages) or None
    return ValidRequest(
        model=msg.model, prompt=msg.prompt or None, messages=messages,
        sampling=sampling_from_proto(msg.sampling), priority=priority_from_proto(msg.priority),
        request_id=msg.request_id, session_id=getattr(msg, "session_id", ""),
        region=getattr(msg, "region", ""), resume_token_ids=tuple(msg.resume_token_ids),
        tenant=getattr(msg, "tenant", ""), share_system_prompt=bool(getattr(msg, "share_system_prompt", False)),
        bypass_response_cache=bool(getattr(msg, "bypass_response_cache", False)))
