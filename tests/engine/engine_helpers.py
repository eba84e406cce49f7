"""Small helpers shared by engine tests."""

from __future__ import annotations

from services.modelserver.engine.base import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams

_counter = iter(range(1_000_000))


def chat(text: str, system: str | None = None, **sampling) -> GenerationRequest:
    msgs = ([ChatMessage("system", system)] if system else []) + [ChatMessage("user", text)]
    return GenerationRequest(f"t{next(_counter)}", "smollm2", messages=msgs, sampling=SamplingParams(**sampling))


def prompt(text: str, **sampling) -> GenerationRequest:
    return GenerationRequest(f"t{next(_counter)}", "smollm2", prompt=text, sampling=SamplingParams(**sampling))


async def collect(engine, request: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(request)]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def tokens_of(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]
