"""TensorRTLLMEngine: our Engine interface over tensorrt_llm.LLM (PyTorch backend).

What it guarantees (docs/architecture.md says the same): streamed text and token ids released
together and never part of a stop string (stream.py); usage.completion_tokens = resumed tokens +
the ids the client received; request priority ordering TensorRT-LLM's waiting queue; load from
iteration stats, `unknown` while there are none (stats.py); KV-cache events as `kv_events()`
(kv_events.py); request errors as INVALID_ARGUMENT, anything else as UNAVAILABLE.

tensorrt_llm is imported in start() (api.py), never at module import, so the server and tests run
on machines without it; tests pass a fake TrtApi instead.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from services.common.tasks import stop_tasks

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
from .api import TrtApi, field_names, import_api
from .config import TrtllmConfig, llm_kwargs
from .kv_bridge import TrtKvCache
from .kv_events import KvEventFeed, Subscription, poll_events
from .mapping import cached_tokens, finish_reason, request_kwargs, sampling_kwargs
from .stats import StatsCache, poll_stats
from .stream import OutputTracker, Release

log = logging.getLogger(__name__)

_DEADLINE = object()  # _next's answer when the request's deadline passed


class TensorRTLLMEngine(Engine):
    backend = "tensorrt_llm"

    def __init__(self, model_name: str, model_path: str, *, api: Callable[[], TrtApi] | None = None,
                 **options: Any) -> None:
        super().__init__(model_name)
        self.model_path = model_path
        if api is not None and not callable(api):
            raise ValueError("api must be a TrtApi factory (tests); it is not a model option")
        self.config = TrtllmConfig.from_options(options)
        self._api_factory = api or import_api
        self._api: TrtApi | None = None
        self._llm: Any = None
        self._accepted: frozenset[str] = frozenset()  # generate_async's keyword names
        self._inflight = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._stats = StatsCache(self.config.max_running, self.config.stats_stale_s)
        self._events = KvEventFeed()
        self.cache: TrtKvCache | None = None
        self._tasks: list[asyncio.Task] = []
        #: streams where TensorRT-LLM took back text or ids already sent (logged; expected 0).
        self.inconsistent_streams = 0

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._llm is not None:
            return
        api = self._api_factory()
        kwargs = llm_kwargs(self.config, api)
        try:
            llm = await asyncio.to_thread(lambda: api.LLM(model=self.model_path, **kwargs))
        except Exception as e:
            raise EngineUnavailableError(f"TensorRT-LLM {api.version} cannot load {self.model_path!r}: {e}") from e
        self._api, self._llm = api, llm
        self._accepted = field_names(llm.generate_async)
        timeout = self.config.poll_timeout_s
        self._events.publish("reset")
        if hasattr(llm, "get_stats_async"):
            self._tasks.append(asyncio.create_task(poll_stats(lambda: llm.get_stats_async(timeout), self._stats)))
        if self.config.kv_event_buffer and hasattr(llm, "get_kv_cache_events_async"):
            self._tasks.append(asyncio.create_task(
                poll_events(lambda: llm.get_kv_cache_events_async(timeout), self._events)))
            # the same KvEvents path as the torch engine (load stream -> routers' index)
            self.cache = TrtKvCache(self.model_path, self.config.block_size, getattr(llm, "tokenizer", None))
            self.cache.follow(self._events.subscribe())

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        await stop_tasks(tasks)
        llm, self._llm = self._llm, None
        self._events.publish("reset")
        if self.cache is not None:
            await self.cache.close()
            self.cache = None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    @property
    def ready(self) -> bool:
        return self._llm is not None

    @property
    def max_context(self) -> int:
        return self.config.max_context

    def load(self) -> EngineLoad:
        now = time.monotonic()
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()
        tps = sum(n for _, n in self._recent) / 10.0
        return self._stats.load(self._inflight, tps, now)

    def kv_events(self) -> Subscription:
        """Blocks stored and evicted on this replica, numbered; see kv_events.py."""
        return self._events.subscribe()

    # ---- requests ------------------------------------------------------------------------------
    def _prompt_ids(self, request: GenerationRequest) -> list[int]:
        tok = self._llm.tokenizer
        try:
            if request.messages:
                text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in request.messages],
                                               tokenize=False, add_generation_prompt=True)
                ids = list(tok.encode(text, add_special_tokens=False))
            else:
                ids = list(tok.encode(request.prompt or ""))
        except Exception as e:  # template errors (a role order the template rejects, ...)
            raise InvalidRequestError(f"cannot tokenize the request: {e}") from e
        if not ids:
            raise InvalidRequestError("the prompt tokenizes to zero tokens")
        return ids

    def _submit(self, ids: list[int], request: GenerationRequest, resumed: int) -> Any:
        assert self._api is not None
        try:
            params = self._api.SamplingParams(**sampling_kwargs(request.sampling, resumed))
            return self._llm.generate_async(ids, sampling_params=params, streaming=True,
                                            **request_kwargs(request, self._accepted))
        except self._api.request_errors as e:
            raise InvalidRequestError(f"TensorRT-LLM rejected the request: {e}") from e
        except Exception as e:
            raise self._failure(e) from e

    def _failure(self, e: BaseException) -> EngineUnavailableError:
        log.error("tensorrt_llm engine %s failed: %r", self.model_name, e)
        return EngineUnavailableError(f"TensorRT-LLM engine for {self.model_name!r} failed ({e}); retry elsewhere")

    async def _next(self, it: AsyncIterator[Any], deadline: float | None) -> Any:
        """The next RequestOutput, _DEADLINE when the deadline passed first; errors mapped."""
        assert self._api is not None
        try:
            if deadline is None:
                return await it.__anext__()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return _DEADLINE
            return await asyncio.wait_for(it.__anext__(), remaining)
        except TimeoutError:
            return _DEADLINE
        except (StopAsyncIteration, asyncio.CancelledError):
            raise
        except self._api.request_errors as e:
            raise InvalidRequestError(f"TensorRT-LLM rejected the request: {e}") from e
        except Exception as e:
            raise self._failure(e) from e

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if self._llm is None:
            raise EngineUnavailableError(f"model {self.model_name!r} is not loaded")
        ids = self._prompt_ids(request)
        p = request.sampling
        if len(ids) + p.max_tokens > self.config.max_context:
            raise InvalidRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) exceeds the "
                                      f"context of {self.config.max_context} tokens")
        resumed = [int(t) for t in request.resume_token_ids]
        stream = self._submit(ids + resumed, request, len(resumed))
        tracker = OutputTracker(p.stop, p.logprobs)
        self._inflight += 1
        done, seen, last = False, 0, None
        try:
            it = stream.__aiter__()
            while True:
                try:
                    out = await self._next(it, request.deadline)
                except StopAsyncIteration:
                    out = None  # ended without a final output: treat what we have as final
                if out is _DEADLINE or out is None:
                    done = True
                    _abort(stream)
                    rel = tracker.finish(*_fields(last)) if last is not None else Release()
                    reason = FinishReason.CANCELLED if out is _DEADLINE else FinishReason.ERROR
                    yield self._final(rel, reason, tracker, ids, resumed, last)
                    return
                last, comp = out, out.outputs[0]
                self._count(len(comp.token_ids) - seen)
                seen = len(comp.token_ids)
                if out.finished:
                    done = True
                    reason = finish_reason(comp.finish_reason) or FinishReason.STOP
                    rel = tracker.finish(*_fields(out), stopped=comp.stop_reason is not None)
                    yield self._final(rel, FinishReason.STOP if tracker.stopped else reason, tracker, ids, resumed, out)
                    return
                rel = tracker.update(*_fields(out))
                if tracker.stopped:  # a stop string TensorRT-LLM did not match as tokens
                    done = True
                    _abort(stream)
                    yield self._final(rel, FinishReason.STOP, tracker, ids, resumed, out)
                    return
                if rel.text or rel.token_ids:
                    yield GenerationChunk(rel.text, rel.token_ids, rel.logprobs)
        finally:
            self._inflight -= 1
            if tracker.inconsistencies:
                self.inconsistent_streams += 1
                log.warning("tensorrt_llm took back output already streamed for %s (%d times); the client "
                            "keeps what it received", request.request_id, tracker.inconsistencies)
            if not done:  # the consumer went away (closed or cancelled): free the slot and KV now
                _abort(stream)

    def _final(self, rel: Release, reason: FinishReason, tracker: OutputTracker, ids: list[int],
               resumed: list[int], out: Any) -> GenerationChunk:
        cached = cached_tokens(out, self.config.block_size) if out is not None else 0
        usage = Usage(len(ids), len(resumed) + len(tracker.token_ids), min(cached, len(ids)))
        return GenerationChunk(rel.text, rel.token_ids, rel.logprobs, reason, usage)

    def _count(self, n: int) -> None:
        if n > 0:
            self._recent.append((time.monotonic(), n))


def _abort(stream: Any) -> None:
    """Abort in TensorRT-LLM; an already finished or failed request may refuse, which is fine."""
    try:
        stream.abort()
    except Exception as e:  # noqa: BLE001 - nothing left to free
        log.debug("abort of a finished tensorrt_llm request: %r", e)


def _fields(out: Any) -> tuple[str, list[int], Any]:
    comp = out.outputs[0]
    return comp.text or "", list(comp.token_ids or ()), comp.logprobs
