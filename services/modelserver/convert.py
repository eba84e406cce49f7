"""Protobuf <-> engine types, at the model server's boundary only."""

from __future__ import annotations

import time

from meshserve.v1 import common_pb2, modelserver_pb2

from services.common.validation import validate_request

from .engine.base import EngineLoad, FinishReason, GenerationChunk, GenerationRequest

_FINISH = {
    FinishReason.LENGTH: common_pb2.FINISH_REASON_LENGTH,
    FinishReason.STOP: common_pb2.FINISH_REASON_STOP,
    FinishReason.CANCELLED: common_pb2.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: common_pb2.FINISH_REASON_ERROR,
}


def request_from_proto(req: modelserver_pb2.ModelServerServiceGenerateRequest,
                       deadline: float | None) -> GenerationRequest:
    """Validated (services/common/validation.py), or InvalidArgument."""
    return GenerationRequest.from_valid(validate_request(req), deadline)


def chunk_to_proto(chunk: GenerationChunk) -> modelserver_pb2.ModelServerServiceGenerateResponse:
    out = modelserver_pb2.ModelServerServiceGenerateResponse(
        text=chunk.text, token_ids=chunk.token_ids, logprobs=chunk.logprobs, cached=chunk.cached)
    if chunk.finish_reason is not None:
        out.finish_reason = _FINISH[chunk.finish_reason]
    if chunk.usage is not None:
        out.usage.prompt_tokens = chunk.usage.prompt_tokens
        out.usage.completion_tokens = chunk.usage.completion_tokens
        out.usage.cached_tokens = chunk.usage.cached_tokens
    return out


def model_load_to_proto(model: str, load: EngineLoad) -> modelserver_pb2.ModelLoad:
    return modelserver_pb2.ModelLoad(
        model=model, queue_depth=load.queue_depth, running=load.running, max_running=load.max_running,
        kv_blocks_used=load.kv_blocks_used, kv_blocks_total=load.kv_blocks_total,
        prefix_cache_hit_rate=load.prefix_cache_hit_rate, tokens_per_second=load.tokens_per_second,
        unknown=load.unknown)


def load_to_proto(server_id: str, loads: dict[str, EngineLoad]) -> modelserver_pb2.LoadReport:
    """One report for the server: per model (what routers use), and the sums (operators' view)."""
    values = list(loads.values())
    n = len(values) or 1
    return modelserver_pb2.LoadReport(
        server_id=server_id,
        queue_depth=sum(x.queue_depth for x in values),
        running=sum(x.running for x in values),
        kv_blocks_used=sum(x.kv_blocks_used for x in values),
        kv_blocks_total=sum(x.kv_blocks_total for x in values),
        max_running=sum(x.max_running for x in values),
        prefix_cache_hit_rate=sum(x.prefix_cache_hit_rate for x in values) / n,
        tokens_per_second=sum(x.tokens_per_second for x in values),
        timestamp_ms=int(time.time() * 1000),
        models=[model_load_to_proto(m, load) for m, load in sorted(loads.items())],
    )
