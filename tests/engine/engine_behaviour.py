"""Behaviour every engine owes the model server, as checks any engine's tests can call.

Each check takes a started engine and a request factory (`make(stop=..., max_tokens=...)` ->
GenerationRequest with greedy sampling), so the torch engine's tests can run the same checks
against SmolLM2 that the TensorRT-LLM tests run against the fake. They assume greedy decoding is
deterministic for a given prompt.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from services.modelserver.engine.base import Engine, FinishReason, GenerationChunk, GenerationRequest
from tests.helpers import eventually

Make = Callable[..., GenerationRequest]


async def collect(engine: Engine, request: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(request)]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def ids_of(chunks: list[GenerationChunk]) -> list[int]:
    return [t for c in chunks for t in c.token_ids]


def assert_well_formed(chunks: list[GenerationChunk], resumed: int = 0) -> None:
    """One final chunk, last; usage counts exactly the ids the client received (plus resumed)."""
    assert chunks, "no chunk at all"
    assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
    final = chunks[-1]
    assert final.finish_reason is not None and final.usage is not None
    assert final.usage.completion_tokens == resumed + len(ids_of(chunks))


async def check_streaming(engine: Engine, make: Make, max_tokens: int = 12) -> list[GenerationChunk]:
    chunks = await collect(engine, make(max_tokens=max_tokens))
    assert_well_formed(chunks)
    assert chunks[-1].finish_reason is FinishReason.LENGTH
    assert len(ids_of(chunks)) == max_tokens
    assert sum(1 for c in chunks if c.token_ids) > 1, "the answer arrived in one piece, not streamed"
    return chunks


async def check_stop_string(engine: Engine, make: Make, stop: str, max_tokens: int = 40) -> None:
    """With a stop string, the client gets exactly the reference text up to it: no chunk ever
    carried part of it, and the ids received are a prefix of the reference ids."""
    ref = await collect(engine, make(max_tokens=max_tokens))
    ref_text = text_of(ref)
    cut = ref_text.find(stop)
    assert cut >= 0, f"the reference answer {ref_text!r} never says {stop!r}: pick another stop string"
    chunks = await collect(engine, make(max_tokens=max_tokens, stop=(stop,)))
    assert_well_formed(chunks)
    assert chunks[-1].finish_reason is FinishReason.STOP
    assert text_of(chunks) == ref_text[:cut]
    got = ids_of(chunks)
    assert got == ids_of(ref)[:len(got)]


async def check_resume(engine: Engine, make: Make, after: int = 5, max_tokens: int = 16) -> None:
    """A request resumed after `after` tokens continues exactly where the first one was (greedy)."""
    ref = await collect(engine, make(max_tokens=max_tokens))
    ref_ids = ids_of(ref)
    req = dataclasses.replace(make(max_tokens=max_tokens), resume_token_ids=ref_ids[:after])
    chunks = await collect(engine, req)
    assert_well_formed(chunks, resumed=after)
    assert ids_of(chunks) == ref_ids[after:]
    prefix_text = text_of(ref)[:len(text_of(ref)) - len(text_of(chunks))]
    assert prefix_text + text_of(chunks) == text_of(ref)


async def check_cancel_frees(engine: Engine, make: Make, busy: Callable[[], bool]) -> None:
    """Closing the stream after one chunk ends the request in the engine."""
    stream = engine.generate(make(max_tokens=500))
    first = await stream.__anext__()
    assert first.finish_reason is None
    await stream.aclose()
    assert await eventually(lambda: not busy(), 10), "the engine kept working for a request nobody reads"


async def check_deadline(engine: Engine, make: Make, seconds: float = 0.05, max_tokens: int = 400) -> None:
    """A request past its deadline ends CANCELLED, with usage for what was sent."""
    req = dataclasses.replace(make(max_tokens=max_tokens), deadline=time.monotonic() + seconds)
    chunks = await collect(engine, req)
    assert_well_formed(chunks)
    assert chunks[-1].finish_reason is FinishReason.CANCELLED
