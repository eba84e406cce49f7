"""What an OpenAI client sees when the mesh fails: before the first chunk an HTTP status, after it
an error event that the openai SDK raises. The gateway's aiohttp app runs on loopback in process,
with a stand-in for the InferenceService client."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Iterator

import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from meshserve.v1 import inference_pb2

from services.common.errors import ResourceExhausted, ServiceError, Unavailable
from services.openai_gateway.app import Gateway, GatewaySettings, Serving
from services.openai_gateway.protocol import Job


class FakeUpstream:
    """Yields one chunk per text for choice 0, then raises `error` (if any)."""

    def __init__(self, texts: list[str], error: ServiceError | None) -> None:
        self.texts = texts
        self.error = error
        self.jobs: list[Job] = []

    async def choices(self, job: Job, rid: str, metadata: object
                      ) -> AsyncGenerator[tuple[int, inference_pb2.GenerateResponse]]:
        self.jobs.append(job)
        for i, text in enumerate(self.texts):
            chunk = inference_pb2.GenerateResponse(text=text, token_ids=[i], request_id=rid)
            chunk.served_by.backend = "sim"
            yield 0, chunk
        if self.error is not None:
            raise self.error


@pytest.fixture
def serving() -> Iterator[Serving]:
    s = Serving()
    s.ready = True
    yield s


async def _client(upstream: FakeUpstream, serving: Serving) -> tuple[TestServer, openai.AsyncOpenAI]:
    server = TestServer(Gateway(upstream, GatewaySettings(), serving).app())  # type: ignore[arg-type]
    await server.start_server()
    client = openai.AsyncOpenAI(base_url=str(server.make_url("/v1")), api_key="-", max_retries=0)
    return server, client


async def test_failure_after_the_first_chunk_is_an_error_event(serving):
    server, client = await _client(FakeUpstream(["a", "b"], Unavailable("the retry budget is spent")), serving)
    try:
        stream = await client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                      stream=True)
        texts = []
        with pytest.raises(openai.APIError) as err:
            async for chunk in stream:
                texts.append(chunk.choices[0].delta.content)  # noqa: PERF401 - it raises midway
        assert texts == ["a", "b"] and "retry budget" in err.value.message
    finally:
        await client.close()
        await server.close()


async def test_failure_before_the_first_chunk_is_an_http_status_also_when_streaming(serving):
    server, client = await _client(FakeUpstream([], ResourceExhausted("shed", retry_after_ms=250)), serving)
    try:
        with pytest.raises(openai.RateLimitError) as err:
            await client.completions.create(model="m", prompt="x", stream=True)
        assert err.value.response.headers["retry-after-ms"] == "250"
        assert err.value.response.headers["retry-after"] == "1"
    finally:
        await client.close()
        await server.close()


async def test_health_follows_serving_and_unknown_paths_are_openai_errors(serving):
    server = TestServer(Gateway(FakeUpstream([], None), GatewaySettings(), serving).app())  # type: ignore[arg-type]
    async with TestClient(server) as http:
        assert (await http.get("/health")).status == 200
        serving.ready = False
        assert (await http.get("/health")).status == 503
        missing = await http.get("/v1/nothing")
        assert missing.status == 404 and (await missing.json())["error"]["type"] == "invalid_request_error"
        wrong = await http.get("/v1/completions")
        assert wrong.status == 405 and wrong.headers["allow"] == "POST"
