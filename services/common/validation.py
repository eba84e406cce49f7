"""Checks on public and internal generate requests, done where a request enters a process.

Routers reject bad input before it costs a hop; model servers check again because they are
reachable on their own. Each check raises ValueError with a message a person can act on; the
gRPC layer turns it into INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from meshserve.v1 import common_pb2

#: Prompt plus message text, in characters. Far below gRPC's message limit so that an oversize
#: request gets INVALID_ARGUMENT with this explanation rather than a transport error.
MAX_INPUT_CHARS = 512 * 1024
MAX_TOKENS_LIMIT = 65_536
DEFAULT_MAX_TOKENS = 128
MAX_STOP_STRINGS = 16
MAX_ID_CHARS = 256
ROLES = ("system", "user", "assistant")
#: Engine backends a model can run on (services/modelserver/engine knows how to build each).
BACKENDS = ("sim", "torch", "tensorrt_llm")


class _GenerateLike(Protocol):
    model: str
    prompt: str
    messages: Sequence[common_pb2.ChatMessage]
    sampling: common_pb2.SamplingParams
    priority: int


def validate_sampling(s: common_pb2.SamplingParams) -> None:
    if s.max_tokens < 0:
        raise ValueError(f"sampling.max_tokens must be >= 0 (0 = default {DEFAULT_MAX_TOKENS}), "
                         f"got {s.max_tokens}")
    if s.max_tokens > MAX_TOKENS_LIMIT:
        raise ValueError(f"sampling.max_tokens must be <= {MAX_TOKENS_LIMIT}, got {s.max_tokens}")
    if math.isnan(s.temperature) or s.temperature < 0:
        raise ValueError(f"sampling.temperature must be >= 0 (0 = greedy), got {s.temperature}")
    if math.isnan(s.top_p) or not 0.0 <= s.top_p <= 1.0:
        raise ValueError(f"sampling.top_p must be in (0, 1] (0 = default 1.0), got {s.top_p}")
    if s.top_k < 0:
        raise ValueError(f"sampling.top_k must be >= 0 (0 = disabled), got {s.top_k}")
    if len(s.stop) > MAX_STOP_STRINGS:
        raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(s.stop)}")
    if any(not x for x in s.stop):
        raise ValueError("stop strings must not be empty")
    if any(t < 0 for t in s.stop_token_ids):
        raise ValueError("stop_token_ids must be >= 0")


def validate_generate(req: _GenerateLike) -> None:
    """Shape checks that need neither a tokenizer nor the mesh state."""
    if not req.model:
        raise ValueError("model is required (see ListModels for what is served)")
    if len(req.model) > MAX_ID_CHARS:
        raise ValueError(f"model name longer than {MAX_ID_CHARS} characters")
    has_prompt, has_messages = bool(req.prompt), len(req.messages) > 0
    if not has_prompt and not has_messages:
        raise ValueError("the request is empty: give a prompt or chat messages")
    if has_prompt and has_messages:
        raise ValueError("give either prompt or messages, not both")
    size = len(req.prompt) + sum(len(m.content) for m in req.messages)
    if size > MAX_INPUT_CHARS:
        raise ValueError(f"input is {size} characters; the limit is {MAX_INPUT_CHARS}")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m.role!r}")
        if not m.content:
            raise ValueError(f"messages[{i}].content is empty")
    if req.priority not in common_pb2.Priority.values():
        raise ValueError(f"unknown priority {req.priority}")
    validate_sampling(req.sampling)
