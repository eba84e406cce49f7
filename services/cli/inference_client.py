"""A small client for the public API, used by `meshctl generate` and the `meshserve up` demo."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.client import resumable


def build_request(model: str, prompt: str = "", chat: bool = False, max_tokens: int = 0,
                  temperature: float = 0.0, session_id: str = "", region: str = "",
                  priority: str = "STANDARD") -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=model, session_id=session_id, region=region,
                                        priority=common_pb2.Priority.Value(f"PRIORITY_{priority}"))
    if chat:
        req.messages.add(role="user", content=prompt)
    else:
        req.prompt = prompt
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = temperature
    return req


def generate(target: str, request: inference_pb2.GenerateRequest,
             timeout: float = 120.0) -> inference_pb2.GenerateResponse:
    with grpc.insecure_channel(target) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=timeout)


def generate_stream(target: str, request: inference_pb2.GenerateRequest,
                    timeout: float = 120.0) -> Iterator[inference_pb2.GenerateResponse]:
    """The answer as it is produced; a stream broken by a dying router resumes on another."""
    with grpc.insecure_channel(target) as channel:
        yield from resumable.stream(inference_pb2_grpc.InferenceServiceStub(channel), request, timeout=timeout)
