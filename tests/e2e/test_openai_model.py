"""The official openai SDK through Envoy and the OpenAI gateway against the real model (SmolLM2 on
the torch engine): chat, streaming, cached-token usage, seeds, stop strings, logprobs and limits."""

from __future__ import annotations

from collections.abc import Iterator

import openai
import pytest

from services.localmesh.mesh import LocalMesh
from tests.e2e.conftest import SMOLLM2

pytestmark = [pytest.mark.e2e, pytest.mark.model]

MODEL = SMOLLM2
# Longer than two of the engine's 64-token KV pages, so a repeat finds whole cached pages.
SYSTEM = ("You are the help desk of a company that rents out electric cargo bikes in three cities. Answer "
          "in one short sentence, politely, without lists or markdown, and never quote prices unless asked. "
          "Bikes can be picked up at any station between seven in the morning and ten at night, and returned "
          "at any station of the same city. Helmets, locks and rain covers come with every bike at no extra "
          "charge. Customers who need a child seat should say so when they book, because only some bikes have "
          "one. If a bike breaks down, the customer should call the hotline and wait with the bike.")


@pytest.fixture(scope="module")
def client(smollm2_mesh: LocalMesh) -> Iterator[openai.OpenAI]:
    """The SDK against Envoy of the session's SmolLM2 mesh (tests/e2e/conftest.py)."""
    with openai.OpenAI(base_url=f"http://{smollm2_mesh.envoy}/v1", api_key="unused", max_retries=0,
                       timeout=120) as c:
        yield c


def ask(text: str, system: str | None = None) -> list:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def test_chat_and_stream_with_the_real_model(client):
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=ask("What is the capital of France?"), max_tokens=16, temperature=0)
    answer = raw.parse()
    assert raw.headers["x-meshserve-simulated"] == "false" and answer.system_fingerprint == "meshserve-torch"
    text = answer.choices[0].message.content
    assert "Paris" in text and answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 16
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=ask("What is the capital of France?"), max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text  # greedy: the same
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_repeated_system_prompt_reports_cached_tokens(client):
    first = client.chat.completions.create(model=MODEL, messages=ask("Where can I park?", SYSTEM), max_tokens=4,
                                           temperature=0)
    second = client.chat.completions.create(model=MODEL, messages=ask("Where can I park?", SYSTEM), max_tokens=4,
                                            temperature=0)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached <= second.usage.prompt_tokens == first.usage.prompt_tokens


def test_seed_stop_logprobs_and_limits(client):
    def sample(seed: int) -> str:
        out = client.chat.completions.create(model=MODEL, messages=ask("Name a fruit."), max_tokens=12,
                                             temperature=1.0, top_p=0.95, seed=seed)
        return out.choices[0].message.content or ""

    assert sample(7) == sample(7)  # the same seed and prompt give the same tokens

    out = client.completions.create(model=MODEL, prompt="The days of the week are Monday, Tuesday,", max_tokens=24,
                                    temperature=0, stop=[" Friday"], logprobs=0)
    choice = out.choices[0]
    assert "Friday" not in choice.text and choice.finish_reason == "stop"
    assert choice.logprobs is not None and "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.token_logprobs) == len(choice.logprobs.tokens) > 0
    assert all(lp <= 0 for lp in choice.logprobs.token_logprobs)

    short = client.chat.completions.create(model=MODEL, messages=ask("Tell me a long story."),
                                           max_completion_tokens=3, temperature=0)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
