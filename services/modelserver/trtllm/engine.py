"""TensorRTLLMEngine: our Engine interface over tensorrt_llm.LLM with streaming and KV block reuse.

tensorrt_llm is imported in start(), never at module import, so the server and tests run on
machines without it; they get EngineUnavailableError with the reason instead.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import time
from collections.abc import AsyncGenerator
from typing import Any

from ..engine.base import (
    Engine,
    EngineLoad,
    EngineUnavailableError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    Usage,
)
from ..engine.options import check_values
from .mapping import chosen_logprobs, finish_reason, priority_kwargs, sampling_kwargs, stream_delta

MISSING = ("tensorrt_llm is not installed; it needs an NVIDIA GPU with CUDA and the tensorrt-llm "
           "package. Use backend torch on this machine.")


def import_tensorrt_llm() -> Any:
    """The tensorrt_llm module, or EngineUnavailableError saying why it cannot run here."""
    try:
        import tensorrt_llm
    except ImportError as e:
        raise EngineUnavailableError(MISSING) from e
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        raise EngineUnavailableError("tensorrt_llm is installed but no CUDA GPU is visible; use backend torch")
    return tensorrt_llm


class TensorRTLLMEngine(Engine):
    backend = "tensorrt_llm"

    def __init__(self, model_name: str, model_path: str, *, max_context: int = 4096, max_running: int = 64,
                 kv_cache_fraction: float = 0.85) -> None:
        super().__init__(model_name)
        check_values("tensorrt_llm", {"max_context": max_context, "max_running": max_running,
                                      "kv_cache_fraction": kv_cache_fraction})
        self.model_path = model_path
        self._max_context = max_context
        self._max_running = max_running
        self._kv_fraction = kv_cache_fraction
        self._llm: Any = None
        self._trt: Any = None
        self._priority_params: set[str] = set()
        self._running = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    async def start(self) -> None:
        trt = import_tensorrt_llm()
        from tensorrt_llm.llmapi import KvCacheConfig

        def build() -> Any:
            return trt.LLM(model=self.model_path, max_seq_len=self._max_context, max_batch_size=self._max_running,
                           kv_cache_config=KvCacheConfig(enable_block_reuse=True,
                                                         free_gpu_memory_fraction=self._kv_fraction))

        self._llm = await asyncio.to_thread(build)
        self._trt = trt
        self._priority_params = set(inspect.signature(self._llm.generate_async).parameters)

    async def stop(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    @property
    def ready(self) -> bool:
        return self._llm is not None

    @property
    def max_context(self) -> int:
        return self._max_context

    def load(self) -> EngineLoad:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()
        tps = sum(n for _, n in self._recent) / 10.0
        # Queue and KV use are internal to the TensorRT-LLM executor (not read yet): unknown, so
        # routers do not take the zeros for an idle server.
        return EngineLoad(queue_depth=0, running=self._running, kv_blocks_used=0, kv_blocks_total=0,
                          max_running=self._max_running, tokens_per_second=tps, unknown=True)

    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self._llm.tokenizer
        if request.messages:
            text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in request.messages],
                                           tokenize=False, add_generation_prompt=True)
            return list(tok.encode(text, add_special_tokens=False))
        return list(tok.encode(request.prompt))

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if self._llm is None:
            raise EngineUnavailableError(f"model {self.model_name!r} is not loaded")
        ids = self._prompt_ids(request)
        p = request.sampling
        if len(ids) + p.max_tokens > self._max_context:
            raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                                      f"context of {self._max_context} tokens")
        resumed = list(request.resume_token_ids)
        params = self._trt.SamplingParams(**sampling_kwargs(p, len(resumed)))
        stream = self._llm.generate_async(ids + resumed, sampling_params=params, streaming=True,
                                          **priority_kwargs(request.priority, self._priority_params))
        self._running += 1
        done = False
        text_len = tok_len = 0
        try:
            iterator = stream.__aiter__()
            while True:
                timeout = None if request.deadline is None else request.deadline - time.monotonic()
                if timeout is not None and timeout <= 0:
                    done = True
                    stream.abort()
                    yield GenerationChunk("", [], finish_reason=FinishReason.CANCELLED,
                                          usage=Usage(len(ids), len(resumed) + tok_len))
                    return
                try:
                    out = await asyncio.wait_for(iterator.__anext__(), timeout)
                except TimeoutError:
                    continue  # the deadline check above ends it
                except StopAsyncIteration:
                    return
                comp = out.outputs[0]
                text, new_ids = stream_delta(text_len, tok_len, comp.text, comp.token_ids)
                logprobs = chosen_logprobs((comp.logprobs or [])[tok_len:], new_ids) if p.logprobs else []
                text_len, tok_len = len(comp.text), len(comp.token_ids)
                self._recent.append((time.monotonic(), len(new_ids)))
                reason = finish_reason(comp.finish_reason) if out.finished else None
                if out.finished and reason is None:
                    reason = FinishReason.STOP
                usage = None
                if reason is not None:
                    done = True
                    cached = getattr(out, "cached_tokens", 0) or 0
                    usage = Usage(len(ids), len(resumed) + tok_len, int(cached))
                yield GenerationChunk(text, new_ids, logprobs, reason, usage)
                if done:
                    return
        finally:
            self._running -= 1
            if not done and hasattr(stream, "abort"):
                stream.abort()
