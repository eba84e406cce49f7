"""A small client for the public API, used by `meshctl generate` and the `meshserve up` demo."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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


def credentials(api_key: str) -> tuple[tuple[str, str], ...]:
    """The metadata that authenticates a client at the edge (none without a key)."""
    return (("authorization", f"Bearer {api_key}"),) if api_key else ()


def generate(target: str, request: inference_pb2.GenerateRequest,
             timeout: float = 120.0, api_key: str = "") -> inference_pb2.GenerateResponse:
    with grpc.insecure_channel(target) as channel:  # the public edge: plaintext by configuration
        return inference_pb2_grpc.InferenceServiceStub(channel).Generate(
            request, timeout=timeout, metadata=credentials(api_key))


def generate_stream(target: str, request: inference_pb2.GenerateRequest,
                    timeout: float = 120.0, api_key: str = "") -> Iterator[inference_pb2.GenerateResponse]:
    """The answer as it is produced; a stream broken by a dying router resumes on another."""
    with grpc.insecure_channel(target) as channel:
        yield from resumable.stream(_Keyed(inference_pb2_grpc.InferenceServiceStub(channel), api_key),
                                    request, timeout=timeout)


class _Keyed:
    """A stub whose every GenerateStream (resumes included) carries the API key."""

    def __init__(self, stub: inference_pb2_grpc.InferenceServiceStub, api_key: str) -> None:
        self._stub = stub
        self._metadata = credentials(api_key)

    def GenerateStream(self, request: inference_pb2.GenerateRequest, timeout: float | None = None) -> Any:
        return self._stub.GenerateStream(request, timeout=timeout, metadata=self._metadata)
