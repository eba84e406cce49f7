"""The real model through the whole mesh: Envoy -> router -> one model server running SmolLM2 on the
torch engine. Checks answers, prefix caching, streaming, a context-overflow error, and /metrics.
Each test sends the requests it checks, so each passes alone and in any order."""

from __future__ import annotations

import re
from collections.abc import Iterator

import grpc
import pytest
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import LocalMesh
from tests.e2e.conftest import SMOLLM2, SMOLLM2_MAX_CONTEXT
from tests.helpers import chat, metrics_text

pytestmark = [pytest.mark.e2e, pytest.mark.model]

MODEL = "smollm2"
MAX_CONTEXT = 1024
SYSTEM = ("You are a helpful assistant for a company that ships spare parts for bicycles across Europe. "
          "Answer in one short sentence, be friendly, do not use lists, do not use markdown, and never "
          "mention prices unless the customer asks for them explicitly.")


@pytest.fixture(scope="module")
def mesh(smollm2_mesh: LocalMesh) -> LocalMesh:
    """The session's SmolLM2 mesh (tests/e2e/conftest.py), shared to load the model once."""
    assert (MODEL, MAX_CONTEXT) == (SMOLLM2, SMOLLM2_MAX_CONTEXT)
    return smollm2_mesh


@pytest.fixture(scope="module")
def stub(mesh: LocalMesh) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(mesh.envoy) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def greedy(text: str, system: str | None = None, max_tokens: int = 16) -> inference_pb2.GenerateRequest:
    return chat(text, model=MODEL, system=system, max_tokens=max_tokens, temperature=0.0)


def test_capital_of_france_from_the_real_model(stub):
    resp = stub.Generate(greedy("What is the capital of France?"), timeout=60)
    assert "Paris" in resp.text
    assert resp.served_by.backend == "torch" and not resp.served_by.simulated
    assert resp.served_by.server_id == "server-0"
    assert resp.finish_reason == common_pb2.FINISH_REASON_STOP
    assert resp.usage.prompt_tokens > 0 and resp.usage.completion_tokens == len(resp.token_ids)


def test_repeated_system_prompt_is_served_from_the_prefix_cache(stub):
    first = stub.Generate(greedy("Where is my order?", system=SYSTEM, max_tokens=8), timeout=60)
    second = stub.Generate(greedy("Where is my order?", system=SYSTEM, max_tokens=8), timeout=60)
    assert second.usage.cached_tokens > 0
    assert second.usage.cached_tokens <= second.usage.prompt_tokens == first.usage.prompt_tokens


def test_stream_concatenates_to_the_unary_answer(stub):
    req = greedy("Name a large ocean.", max_tokens=24)
    unary = stub.Generate(req, timeout=60)
    chunks = list(stub.GenerateStream(req, timeout=60))
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == unary.text
    assert [t for c in chunks for t in c.token_ids] == list(unary.token_ids)
    assert chunks[-1].finish_reason == unary.finish_reason
    assert all(c.served_by.backend == "torch" for c in chunks)


def test_request_beyond_the_context_is_invalid_and_server_keeps_serving(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.Generate(greedy("Tell me a story. " * 20, max_tokens=MAX_CONTEXT), timeout=60)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "context" in info.value.details() and str(MAX_CONTEXT) in info.value.details()
    resp = stub.Generate(greedy("What is the capital of France?"), timeout=60)
    assert "Paris" in resp.text


def test_metrics_show_the_requests(mesh, stub):
    def value(text: str, metric: str, labels: str = f'model="{MODEL}"') -> float:
        m = re.search(rf"^{re.escape(metric)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    names = ["meshserve_modelserver_time_to_first_token_seconds_count",
             "meshserve_modelserver_prompt_tokens_total", "meshserve_modelserver_generated_tokens_total",
             "meshserve_modelserver_cached_prompt_tokens_total"]
    invalid = f'code="INVALID_ARGUMENT",model="{MODEL}"'
    page = metrics_text(mesh.metrics["server-0"])
    before = {n: value(page, n) for n in names}
    invalid_before = value(page, "meshserve_modelserver_requests_total", invalid)
    for _ in range(2):  # the second finds the system prompt's blocks in the prefix cache
        stub.Generate(greedy("Where is my order?", system=SYSTEM, max_tokens=4), timeout=60)
    with pytest.raises(grpc.RpcError):
        stub.Generate(greedy("Tell me a story. " * 20, max_tokens=MAX_CONTEXT), timeout=60)
    page = metrics_text(mesh.metrics["server-0"])
    for n in names:
        assert value(page, n) > before[n], f"{n} did not grow"
    assert value(page, "meshserve_modelserver_requests_total", invalid) == invalid_before + 1
    assert value(page, "meshserve_modelserver_kv_blocks_total") == 256
