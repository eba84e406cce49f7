"""Continuing a stream on another server after the first one failed mid-answer.

The new attempt gets the prompt plus every token already relayed (`resume_token_ids`) and
generates the rest, so the client reads one answer; with greedy decoding it is the answer an
uninterrupted run gives. Engines disagree on usage after a resume: the torch and TensorRT-LLM
engines count the resumed tokens in completion_tokens, the sim engine counts only what it
generated itself. `client_usage` makes usage what the client received either way.
"""

from __future__ import annotations

from meshserve.v1 import common_pb2, modelserver_pb2

#: Backends whose usage.completion_tokens already includes resume_token_ids.
COUNTS_RESUMED = frozenset({"torch", "tensorrt_llm"})


def resume_request(base: modelserver_pb2.ModelServerServiceGenerateRequest,
                   relayed: list[int]) -> modelserver_pb2.ModelServerServiceGenerateRequest:
    """The same request, continuing after `relayed` tokens."""
    out = modelserver_pb2.ModelServerServiceGenerateRequest()
    out.CopyFrom(base)
    del out.resume_token_ids[:]
    out.resume_token_ids.extend(relayed)
    return out


def client_usage(usage: common_pb2.Usage, backend: str, resumed: int) -> common_pb2.Usage:
    """Usage as the client sees it: completion counts every token of the whole answer."""
    if not resumed:
        return usage
    out = common_pb2.Usage()
    out.CopyFrom(usage)
    if backend in COUNTS_RESUMED:
        out.completion_tokens = max(usage.completion_tokens, resumed)
    else:
        out.completion_tokens = usage.completion_tokens + resumed
    return out
