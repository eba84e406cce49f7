"""A small client for the public API, used by `meshctl generate` and the `meshserve up` demo."""

from __future__ import annotations

import collections
import os
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


class _Details(collections.namedtuple("_Details", ("method", "timeout", "metadata", "credentials",
                                                    "wait_for_ready", "compression")),
               grpc.ClientCallDetails):
    pass


class _ApiKeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                         grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the API key to every call on a channel to the public edge."""

    def __init__(self, api_key: str) -> None:
        self._metadata = credentials(api_key)

    def _with_key(self, d: Any) -> _Details:
        return _Details(d.method, d.timeout, (*(d.metadata or ()), *self._metadata), d.credentials,
                        d.wait_for_ready, d.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._with_key(details), request)

    def intercept_stream_unary(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):
        return continuation(self._with_key(details), requests)


def edge_channel(target: str, api_key: str | None = None) -> grpc.Channel:
    """A channel to the public edge (plaintext by configuration) whose calls carry the API key
    (default: $MESHSERVE_API_KEY; none when unset)."""
    key = os.environ.get("MESHSERVE_API_KEY", "") if api_key is None else api_key
    channel = grpc.insecure_channel(target)
    return grpc.intercept_channel(channel, _ApiKeyInterceptor(key)) if key else channel
