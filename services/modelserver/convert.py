"""Protobuf <-> engine types, at the model server's boundary only."""

from __future__ import annotations

import time

from meshserve.v1 import common_pb2, modelserver_pb2

from services.common.validation import DEFAULT_MAX_TOKENS

from .engine.base import (
    ChatMessage,
    EngineLoad,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    Priority,
    SamplingParams,
)

_FINISH = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def sampling_from_proto(s: common_pb2.SamplingParams) -> SamplingParams:
    return SamplingParams(
        max_tokens=s.max_tokens or DEFAULT_MAX_TOKENS,
        temperature=s.temperature,
        top_p=s.top_p or 1.0,
        top_k=s.top_k,
        seed=s.seed if s.HasField("seed") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        logprobs=s.logprobs,
    )


def request_from_proto(req: modelserver_pb2.ModelServerServiceGenerateRequest,
                       deadline: float | None) -> GenerationRequest:
    priority = Priority(req.priority) if req.priority else Priority.STANDARD
    return GenerationRequest(
        request_id=req.request_id,
        model=req.model,
        prompt=req.prompt or None,
        messages=[ChatMessage(m.role, m.content) for m in req.messages] or None,
        sampling=sampling_from_proto(req.sampling),
        priority=priority,
        resume_token_ids=list(req.resume_token_ids),
        deadline=deadline,
    )


def chunk_to_proto(chunk: GenerationChunk) -> modelserver_pb2.ModelServerServiceGenerateResponse:
    out = modelserver_pb2.ModelServerServiceGenerateResponse(
        text=chunk.text, token_ids=chunk.token_ids, logprobs=chunk.logprobs)
    if chunk.finish_reason is not None:
        out.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        out.usage.prompt_tokens = chunk.usage.prompt_tokens
        out.usage.completion_tokens = chunk.usage.completion_tokens
        out.usage.cached_tokens = chunk.usage.cached_tokens
    return out


def load_to_proto(server_id: str, loads: list[EngineLoad]) -> modelserver_pb2.LoadReport:
    """One report for the whole server: the sum over its engines."""
    n = len(loads) or 1
    return modelserver_pb2.LoadReport(
        server_id=server_id,
        queue_depth=sum(x.queue_depth for x in loads),
        running=sum(x.running for x in loads),
        kv_blocks_used=sum(x.kv_blocks_used for x in loads),
        kv_blocks_total=sum(x.kv_blocks_total for x in loads),
        max_running=sum(x.max_running for x in loads),
        prefix_cache_hit_rate=sum(x.prefix_cache_hit_rate for x in loads) / n,
        tokens_per_second=sum(x.tokens_per_second for x in loads),
        timestamp_ms=int(time.time() * 1000),
    )
