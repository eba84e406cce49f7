"""The torch engines the cache benchmark's in-process phases drive, and how they are timed."""

from __future__ import annotations

import time
from typing import Any

from services.modelserver.engine.base import GenerationRequest, SamplingParams
from services.modelserver.torch_engine import TorchEngine, TorchEngineConfig

MODEL = "smollm2"


def config() -> TorchEngineConfig:
    return TorchEngineConfig(threads=2, kv_cache_blocks=96, max_running=8, step_token_budget=512,
                             max_context=2048, warmup=True)


async def ttft(engine: TorchEngine, prompt: str, tenant: str = "bench", max_tokens: int = 8) -> dict[str, Any]:
    req = GenerationRequest(request_id="bench", model=MODEL, prompt=prompt, tenant=tenant,
                            sampling=SamplingParams(max_tokens=max_tokens))
    started = time.monotonic()
    first = None
    ids: list[int] = []
    cached = 0
    async for chunk in engine.generate(req):
        if first is None and chunk.token_ids:
            first = time.monotonic() - started
        ids += chunk.token_ids
        if chunk.usage is not None:
            cached, prompt_tokens = chunk.usage.cached_tokens, chunk.usage.prompt_tokens
    return {"ttft_s": first, "ids": ids, "cached_tokens": cached, "prompt_tokens": prompt_tokens}


class Detached:
    """The engine without its shared tier (as if the server had no store), for baselines."""

    def __init__(self, engine: TorchEngine) -> None:
        self.engine = engine

    def __enter__(self) -> None:
        assert self.engine.core is not None and self.engine.cache is not None
        self.tier = self.engine.cache.tier
        self.engine.core.tier = self.engine.cache.tier = None

    def __exit__(self, *exc: object) -> None:
        assert self.engine.core is not None and self.engine.cache is not None
        self.engine.core.tier = self.engine.cache.tier = self.tier
