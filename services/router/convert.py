"""The router's wire conversions: a validated request to the model server's request, and the
model server's chunks to the public answer (labelled with the replica that produced them)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from meshserve.v1 import common_pb2, inference_pb2, modelserver_pb2

from services.common.validation import SamplingParams, ValidRequest

from .replica import Replica


def sampling_to_proto(s: SamplingParams) -> common_pb2.SamplingParams:
    out = common_pb2.SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                    top_k=s.top_k, stop=s.stop, stop_token_ids=s.stop_token_ids,
                                    logprobs=s.logprobs)
    if s.seed is not None:
        out.seed = s.seed
    return out


def upstream_request(req: ValidRequest, request_id: str) -> modelserver_pb2.ModelServerServiceGenerateRequest:
    """What every attempt sends; a migration adds the tokens relayed so far (`with_resume`)."""
    out = modelserver_pb2.ModelServerServiceGenerateRequest(
        request_id=request_id, model=req.model, prompt=req.prompt or "",
        sampling=sampling_to_proto(req.sampling), priority=common_pb2.Priority.ValueType(req.priority),
        resume_token_ids=req.resume_token_ids, tenant=req.tenant, share_system_prompt=req.share_system_prompt,
        bypass_response_cache=req.bypass_response_cache)
    for m in req.messages or ():
        out.messages.add(role=m.role, content=m.content)
    return out


def with_resume(base: modelserver_pb2.ModelServerServiceGenerateRequest,
                relayed: Sequence[int]) -> modelserver_pb2.ModelServerServiceGenerateRequest:
    """The same request, continuing after `relayed` tokens."""
    out = modelserver_pb2.ModelServerServiceGenerateRequest()
    out.CopyFrom(base)
    del out.resume_token_ids[:]
    out.resume_token_ids.extend(relayed)
    return out


def template(replica: Replica, router_id: str, request_id: str) -> inference_pb2.GenerateResponse:
    """What every chunk of one attempt shares: the request id and `served_by` of the replica."""
    out = inference_pb2.GenerateResponse(request_id=request_id)
    sb = out.served_by
    sb.server_id = replica.server_id
    sb.region = replica.region
    sb.zone = replica.zone
    sb.router_id = router_id
    sb.backend = replica.backend
    sb.simulated = replica.simulated
    return out


def public_chunk(part: modelserver_pb2.ModelServerServiceGenerateResponse,
                 base: inference_pb2.GenerateResponse) -> inference_pb2.GenerateResponse:
    out = inference_pb2.GenerateResponse()
    out.CopyFrom(base)
    out.text = part.text
    out.token_ids.extend(part.token_ids)
    if part.logprobs:
        out.logprobs.extend(part.logprobs)
    out.finish_reason = part.finish_reason
    if part.cached:
        out.served_by.cached = True
    if part.HasField("usage"):
        out.usage.CopyFrom(part.usage)
    return out


def closing_chunk(base: inference_pb2.GenerateResponse, completion_tokens: int) -> inference_pb2.GenerateResponse:
    """Every token arrived but the stream broke before its last chunk: close it as LENGTH."""
    out = inference_pb2.GenerateResponse()
    out.CopyFrom(base)
    out.finish_reason = common_pb2.FINISH_REASON_LENGTH
    out.usage.completion_tokens = completion_tokens
    return out


def merge_chunks(chunks: Iterable[inference_pb2.GenerateResponse]) -> inference_pb2.GenerateResponse:
    """A streamed answer as one response: texts joined, the last chunk's finish and usage."""
    answer = inference_pb2.GenerateResponse()
    texts: list[str] = []
    for chunk in chunks:
        texts.append(chunk.text)
        answer.token_ids.extend(chunk.token_ids)
        answer.logprobs.extend(chunk.logprobs)
        answer.served_by.CopyFrom(chunk.served_by)
        answer.request_id = chunk.request_id
        if chunk.finish_reason:
            answer.finish_reason = chunk.finish_reason
        if chunk.HasField("usage"):
            answer.usage.CopyFrom(chunk.usage)
    answer.text = "".join(texts)
    return answer
