"""Small helpers shared by engine tests."""

from __future__ import annotations

import asyncio
import time

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


async def wait_until(predicate, timeout: float = 30.0) -> bool:
    """Poll a condition; returns whether it became true (tests assert on the result, not on time)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()
