"""The mesh's answer chunks as OpenAI objects: whole responses, stream chunks and usage.

Pure functions over `GenerateResponse` chunks, so every shape is unit-tested without a server.

Log-probabilities: the mesh returns the log-probability of each chosen token, and chunks carry
text per chunk, not per token (the gateway has no tokenizer). A chunk of one token gives that
token its text; in a chunk of several tokens (text held back across a multi-byte character or a
possible stop string) the text goes with the last of them and the others get "", so the tokens
always join to exactly the answer's text.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from meshserve.v1 import common_pb2, inference_pb2

from .protocol import Job

_FINISH = {common_pb2.FINISH_REASON_STOP: "stop", common_pb2.FINISH_REASON_LENGTH: "length",
           common_pb2.FINISH_REASON_CANCELLED: "cancelled", common_pb2.FINISH_REASON_ERROR: "error"}


def finish_reason(value: int) -> str | None:
    return _FINISH.get(value)  # type: ignore[call-overload]


def token_texts(chunk: inference_pb2.GenerateResponse) -> list[str]:
    """One string per token id of the chunk (see the module docstring)."""
    n = len(chunk.token_ids)
    return [chunk.text if i == n - 1 else "" for i in range(n)]


@dataclass
class Choice:
    """What one choice has received so far (whole-response mode keeps all of it)."""

    index: int
    prefix: str = ""  # the prompt, for completions with echo
    texts: list[str] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: str | None = None
    usage: inference_pb2.GenerateResponse | None = None  # the chunk that carried usage
    served_by: Any = None

    def add(self, chunk: inference_pb2.GenerateResponse) -> None:
        self.texts.append(chunk.text)
        if chunk.logprobs:
            self.tokens.extend(token_texts(chunk))
            self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason:
            self.finish = finish_reason(chunk.finish_reason)
        if chunk.HasField("usage"):
            self.usage = chunk
        self.served_by = chunk.served_by

    @property
    def text(self) -> str:
        return self.prefix + "".join(self.texts)


@dataclass
class Header:
    """What every object of one answer shares."""

    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    fingerprint: str = "meshserve"
    service_tier: str | None = None

    def of(self, object_: str) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "object": object_, "created": self.created, "model": self.model,
                               "system_fingerprint": self.fingerprint}
        if self.service_tier:
            out["service_tier"] = self.service_tier
        return out


def fingerprint(chunk: inference_pb2.GenerateResponse) -> str:
    """Names the backend that answered (and says so when it is the simulated engine)."""
    backend = chunk.served_by.backend or "unknown"
    return f"meshserve-{backend}" + ("-simulated" if chunk.served_by.simulated else "")


def usage(choices: list[Choice], n: int) -> dict[str, Any]:
    """Prompt tokens count once per distinct prompt (OpenAI's rule for n > 1: choice i answers
    prompt i // n); completion tokens add up over every choice."""
    prompt = cached = completion = 0
    seen: set[int] = set()
    for c in choices:
        if c.usage is None:
            continue
        u = c.usage.usage
        completion += u.completion_tokens
        group = c.index // max(1, n)
        if group not in seen:
            seen.add(group)
            prompt += u.prompt_tokens
            cached += u.cached_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def chat_logprobs(tokens: list[str], logprobs: list[float]) -> dict[str, Any]:
    return {"content": [{"token": t, "logprob": lp, "bytes": list(t.encode()), "top_logprobs": []}
                        for t, lp in zip(tokens, logprobs, strict=False)], "refusal": None}


def completion_logprobs(tokens: list[str], logprobs: list[float], offset: int) -> dict[str, Any]:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": None, "text_offset": offsets}


def chat_response(job: Job, head: Header, choices: list[Choice]) -> dict[str, Any]:
    out = head.of("chat.completion")
    out["choices"] = [{
        "index": c.index, "message": {"role": "assistant", "content": c.text, "refusal": None},
        "logprobs": chat_logprobs(c.tokens, c.logprobs) if job.sampling.logprobs else None,
        "finish_reason": c.finish} for c in choices]
    out["usage"] = usage(choices, job.n)
    return out


def completion_response(job: Job, head: Header, choices: list[Choice]) -> dict[str, Any]:
    out = head.of("text_completion")
    out["choices"] = [{
        "index": c.index, "text": c.text,
        "logprobs": completion_logprobs(c.tokens, c.logprobs, len(c.prefix)) if job.sampling.logprobs else None,
        "finish_reason": c.finish} for c in choices]
    out["usage"] = usage(choices, job.n)
    return out


def chat_chunk(job: Job, head: Header, index: int, chunk: inference_pb2.GenerateResponse | None,
               first: bool) -> dict[str, Any]:
    """One streamed choice update; `first` adds the assistant role (OpenAI's first delta)."""
    delta: dict[str, Any] = {"role": "assistant"} if first else {}
    if chunk is not None and (chunk.text or first):
        delta["content"] = chunk.text
    choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None, "finish_reason": None}
    if chunk is not None:
        if job.sampling.logprobs and chunk.token_ids:
            choice["logprobs"] = chat_logprobs(token_texts(chunk), list(chunk.logprobs))
        choice["finish_reason"] = finish_reason(chunk.finish_reason)
    out = head.of("chat.completion.chunk")
    out["choices"] = [choice]
    if job.include_usage:
        out["usage"] = None
    return out


def completion_chunk(job: Job, head: Header, index: int, text: str,
                     chunk: inference_pb2.GenerateResponse, offset: int) -> dict[str, Any]:
    """One streamed completion update; `text` is the chunk's text (plus the prompt, when echoed)."""
    logprobs = None
    if job.sampling.logprobs and chunk.token_ids:
        logprobs = completion_logprobs(token_texts(chunk), list(chunk.logprobs), offset)
    out = head.of("text_completion")
    out["choices"] = [{"index": index, "text": text, "logprobs": logprobs,
                       "finish_reason": finish_reason(chunk.finish_reason)}]
    if job.include_usage:
        out["usage"] = None
    return out


def usage_chunk(job: Job, head: Header, choices: list[Choice]) -> dict[str, Any]:
    """The last chunk with stream_options.include_usage: no choices, the whole request's usage."""
    out = head.of("chat.completion.chunk" if job.kind == "chat" else "text_completion")
    out["choices"] = []
    out["usage"] = usage(choices, job.n)
    return out
