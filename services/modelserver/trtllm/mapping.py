"""Pure translations between our engine types and TensorRT-LLM's LLM API (no tensorrt_llm import),
so they are unit tested on machines without a GPU."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..engine.base import FinishReason, Priority, SamplingParams

# tensorrt_llm executor priorities are floats in [0, 1], higher first, default 0.5.
_PRIORITY = {Priority.CRITICAL: 1.0, Priority.STANDARD: 0.5, Priority.SHEDDABLE: 0.0}


def sampling_kwargs(p: SamplingParams, resumed: int = 0) -> dict[str, Any]:
    """Keyword arguments for tensorrt_llm.SamplingParams.

    Greedy is expressed as top_k=1 (TensorRT-LLM's greedy path); top_k=0 means "off" for us and
    is left unset for it. Resumed tokens count against max_tokens, as in our engine. Stop strings
    are excluded from the output, matching the torch backend.
    """
    kw: dict[str, Any] = {"max_tokens": p.max_tokens - resumed, "detokenize": True,
                          "include_stop_str_in_output": False}
    if p.temperature == 0.0:
        kw.update(top_k=1, top_p=1.0)
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


def priority_kwargs(priority: Priority, accepted: Iterable[str]) -> dict[str, Any]:
    """`priority=` for generate_async when this TensorRT-LLM version accepts it; older versions
    have no per-request priority in the LLM API, so it is dropped (their scheduler is FCFS)."""
    return {"priority": _PRIORITY[Priority(priority)]} if "priority" in set(accepted) else {}


def finish_reason(raw: str | None) -> FinishReason | None:
    """CompletionOutput.finish_reason ("stop", "length", "cancelled", None while running)."""
    if raw is None:
        return None
    return {"stop": FinishReason.STOP, "length": FinishReason.LENGTH,
            "cancelled": FinishReason.CANCELLED}.get(str(raw), FinishReason.ERROR)


def chosen_logprobs(entries: Sequence[Any], token_ids: Sequence[int]) -> list[float]:
    """Log-probabilities of the tokens actually produced.

    Versions return either floats or {token_id: Logprob(logprob=..., rank=...)} per position.
    """
    out: list[float] = []
    # Some versions return fewer entries than tokens: score what is there.
    for entry, tok in zip(entries, token_ids, strict=False):
        if isinstance(entry, Mapping):
            lp = entry.get(tok)
            if lp is not None:
                out.append(float(lp.logprob if hasattr(lp, "logprob") else lp))
        else:
            out.append(float(entry))
    return out


def stream_delta(prev_text: int, prev_tokens: int, text: str, token_ids: Sequence[int]) -> tuple[str, list[int]]:
    """New text and tokens since the last streamed RequestOutput (its fields are cumulative)."""
    return text[prev_text:], list(token_ids[prev_tokens:])
