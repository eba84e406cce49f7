"""Pure translations between our engine types and TensorRT-LLM's LLM API (no tensorrt_llm import),
so they are unit tested on machines without a GPU; contract.py checks the names they produce."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..engine.base import FinishReason, GenerationRequest, Priority, SamplingParams

# TensorRT-LLM request priorities are floats in [0, 1], higher first, default 0.5.
_PRIORITY = {Priority.CRITICAL: 1.0, Priority.STANDARD: 0.5, Priority.SHEDDABLE: 0.0}


def sampling_kwargs(p: SamplingParams, resumed: int = 0) -> dict[str, Any]:
    """Keyword arguments for tensorrt_llm.SamplingParams.

    Greedy is temperature 0 with top_k=1 (TensorRT-LLM's greedy path); top_k=0 means "off" for us
    and is left unset for it. Resumed tokens count against max_tokens, as in our engine. Stop
    strings go to TensorRT-LLM so it stops early; the engine also matches them on the text
    (stream.py), because TensorRT-LLM matches them as token sequences only.
    """
    kw: dict[str, Any] = {"max_tokens": p.max_tokens - resumed, "detokenize": True,
                          "include_stop_str_in_output": False}
    if p.temperature == 0.0:
        kw.update(temperature=0.0, top_k=1, top_p=1.0)
    else:
        kw.update(temperature=p.temperature, top_p=p.top_p)
        if p.top_k > 0:
            kw["top_k"] = p.top_k
    if p.seed is not None:
        kw["seed"] = p.seed
    if p.stop:
        kw["stop"] = list(p.stop)
    if p.stop_token_ids:
        kw["stop_token_ids"] = list(p.stop_token_ids)
    if p.logprobs:
        kw["logprobs"] = 1  # the sampled token's log-probability (top-1 alternatives)
    return kw


def priority_value(priority: Priority) -> float:
    return _PRIORITY[Priority(priority)]


def cache_salt(request: GenerationRequest) -> str | None:
    """The KV-cache salt: requests share cached prefixes only within one salt.

    Hook for tenancy: the salt is the request's tenant when requests carry one (they do not yet;
    a `tenant` attribute on GenerationRequest is all this needs), so one tenant can never time
    another's prompts through cache hits. None = one shared cache, as today.
    """
    tenant = getattr(request, "tenant", None)
    return tenant if isinstance(tenant, str) and tenant else None


def request_kwargs(request: GenerationRequest, accepted: Iterable[str]) -> dict[str, Any]:
    """`priority=` and `cache_salt=` for generate_async, each only where this version accepts it."""
    names = set(accepted)
    kw: dict[str, Any] = {}
    if "priority" in names:
        kw["priority"] = priority_value(request.priority)
    salt = cache_salt(request)
    if salt is not None and "cache_salt" in names:
        kw["cache_salt"] = salt
    return kw


def finish_reason(raw: str | None) -> FinishReason | None:
    """CompletionOutput.finish_reason: "stop", "length", "cancelled", "timeout" (the executor's
    own time limit: the request ran out of time, as with our deadlines), None while running."""
    if raw is None:
        return None
    return {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "cancelled": FinishReason.CANCELLED,
            "timeout": FinishReason.CANCELLED}.get(str(raw), FinishReason.ERROR)


def cached_tokens(out: Any, block_size: int) -> int:
    """Prompt tokens served from the KV cache, where this version reports them: a count on the
    output, or the request's reused blocks in its perf metrics (whole blocks)."""
    for name in ("cached_tokens", "num_cached_tokens"):
        v = getattr(out, name, None)
        if isinstance(v, int) and v >= 0:
            return v
    outputs = getattr(out, "outputs", None) or [None]
    metrics = getattr(getattr(outputs[0], "request_perf_metrics", None), "kv_cache_metrics", None)
    blocks = getattr(metrics, "num_reused_blocks", None)
    return blocks * block_size if isinstance(blocks, int) and blocks > 0 else 0
