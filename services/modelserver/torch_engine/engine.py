"""TorchEngine: the asyncio face of EngineCore.

The core loop runs in one dedicated thread (torch releases the GIL inside kernels, so the event
loop stays responsive); requests and aborts reach it through an inbox guarded by a condition
variable, and chunks come back per request via loop.call_soon_threadsafe into an asyncio.Queue.

Backpressure: each stream counts chunks sent (core thread) and taken (consumer). A request whose
consumer lets `pause_chunks` pile up is paused - the scheduler skips it and it keeps its KV
blocks - until the consumer drains it to `resume_chunks`; others run on meanwhile. A consumer
that never comes back is cancelled by whoever owns it closing the iterator.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from ..engine.base import (
    CapacityError,
    Engine,
    EngineLoad,
    EngineUnavailableError,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from .cache_link import EngineCache
from .config import TorchEngineConfig, resolve_dtype
from .engine_core import CoreRequest, EngineCore
from .model import KVCache, LlamaModel
from .tokenizer import Tokenizer
from .weights import CheckpointError, load_checkpoint, resolve_source

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent: int = 0  # written by the core thread only
    taken: int = 0  # written by the consumer only
    paused: bool = False  # core thread's view, mirrored into the scheduler

    @property
    def unread(self) -> int:
        return self.sent - self.taken


class TorchEngine(Engine):
    backend = "torch"

    def __init__(self, model_name: str, source: str, config: TorchEngineConfig | None = None) -> None:
        super().__init__(model_name)
        self.source = source
        self.config = config or TorchEngineConfig()
        self.config.validate()
        self.core: EngineCore | None = None
        self.cache: EngineCache | None = None
        self.tokenizer: Tokenizer | None = None
        self.dtype: torch.dtype | None = None
        self._vocab_size = 0
        self._max_context = self.config.max_context or 2048
        self._cv = threading.Condition()
        self._inbox: list[tuple[str, object]] = []
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._shutdown = False
        self._accepting = False
        self._ready = False

    # ---- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        if self._thread is not None:
            return
        loop = asyncio.get_running_loop()
        loaded: asyncio.Future[None] = loop.create_future()
        self._shutdown = False
        self._thread = threading.Thread(target=self._main, args=(loop, loaded), name=f"torch-engine-{self.model_name}",
                                        daemon=True)
        self._thread.start()
        try:
            await loaded
        except (CheckpointError, OSError) as e:
            self._thread = None
            raise EngineUnavailableError(f"cannot load model {self.model_name!r} from {self.source!r}: {e}") from e
        except BaseException:  # cancelled while loading: the thread ends once loaded
            with self._cv:
                self._shutdown = True
            self._thread = None
            raise
        self._accepting = True
        if self.config.warmup:
            warm = GenerationRequest(request_id="warmup", model=self.model_name, prompt="Hello",
                                     sampling=SamplingParams(max_tokens=2))
            async for _ in self.generate(warm):
                pass
        self._ready = True

    def _main(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        """The engine thread: load, then run the step loop. Every parallel torch op of the engine runs
        on this one thread: with libgomp, an idle OpenMP pool left by another thread (loading in an
        executor did) made each parallel region here ~2x slower (measured: a forward at batch 1 took
        47 instead of 32 ms, and c=1 end to end fell from 25 to 18 tok/s)."""

        def report(exc: BaseException | None) -> None:
            if loaded.done():
                return
            if exc is None:
                loaded.set_result(None)
            else:
                loaded.set_exception(exc)

        try:
            self._load()
        except BaseException as e:  # noqa: BLE001 - handed to start(), which maps it
            with contextlib.suppress(RuntimeError):  # start()'s loop is gone
                loop.call_soon_threadsafe(report, e)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(report, None)
        self._run()

    def _load(self) -> None:
        """Blocking part of start(), on the engine thread: weights, tokenizer, KV pool, core."""
        cfg = self.config
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        path = resolve_source(self.source)
        args, tensors = load_checkpoint(path)
        tokenizer = Tokenizer(path)
        dtype = resolve_dtype(cfg.dtype)
        max_context = min(args.max_position, cfg.max_context or args.max_position)
        model = LlamaModel(args, tensors, dtype, max_context, int8_max_tokens=cfg.int8_max_tokens,
                           invariant_rows=cfg.invariant_rows if cfg.batch_invariant else 0)
        del tensors
        num_blocks = cfg.num_blocks(KVCache.bytes_per_block(args, cfg.block_size, dtype, cfg.kv_cache_dtype))
        kv = KVCache.allocate(args, num_blocks, cfg.block_size, dtype, cfg.kv_cache_dtype)
        core = EngineCore(model, kv, tokenizer.decode, tokenizer.eos_token_ids, cfg.max_running,
                          cfg.step_token_budget, max_context)
        self.cache = EngineCache(self.model_name, path, args, dtype, cfg, kv, core.blocks, tokenizer)
        core.tier = self.cache.tier
        if core.tier is not None:  # an idle loop wakes to unpin what the writer copied (load reports count pins)
            core.tier.on_released = self._wake
        self.core = core
        self.tokenizer, self.dtype = tokenizer, dtype
        self._vocab_size, self._max_context = args.vocab_size, max_context
        log.info("torch engine %s: %s, %d KV blocks of %d tokens (%s), max context %d", self.model_name, dtype,
                 num_blocks, cfg.block_size, kv.k.dtype, max_context)

    async def stop(self) -> None:
        self._accepting = False
        self._ready = False
        thread = self._thread
        if thread is not None:
            with self._cv:
                self._shutdown = True
                self._cv.notify()
            await asyncio.to_thread(thread.join)
            self._thread = None
        self._deliver([(rid, EngineUnavailableError("engine stopped")) for rid in list(self._streams)])
        if self.cache is not None:
            self.cache.close()
        self.core = None

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def max_context(self) -> int:
        return self._max_context

    def load(self) -> EngineLoad:
        core = self.core
        if core is None:
            return EngineLoad(0, 0, 0, 0, self.config.max_running)
        s = core.scheduler
        return EngineLoad(
            queue_depth=len(s.waiting) + len(self._inbox), running=len(s.running),
            kv_blocks_used=core.kv_blocks_in_use(), kv_blocks_total=core.blocks.num_blocks,
            max_running=s.max_running, prefix_cache_hit_rate=core.blocks.hit_rate,
            tokens_per_second=core.tokens_per_second(), preemptions_total=s.num_preemptions,
            prefix_cache_hit_tokens_total=core.blocks.hit_tokens)

    # ---- requests ------------------------------------------------------------------------------
    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if not self._accepting or self.core is None:
            raise EngineUnavailableError(f"model {self.model_name!r} is not loaded")
        core_req = self._prepare(request)
        if len(self._inbox) + len(self.core.scheduler.waiting) >= self.config.max_waiting:
            raise CapacityError(f"{self.config.max_waiting} requests already wait for model {self.model_name!r}")
        if self.cache is not None:  # key the prompt; fetch shared blocks after the local hit (off the step loop)
            core_req.cache = self.cache.keying(request, core_req.prompt_ids)
            core_req.remote = await self.cache.prefetch(core_req.cache, core_req.prompt_ids)
            if not self._accepting or self.core is None:
                raise EngineUnavailableError(f"model {self.model_name!r} is not loaded")
        rid = f"{request.request_id}#{next(self._ids)}"
        core_req.request_id = rid
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[rid] = stream
        self._submit("add", core_req)
        done = False
        try:
            while True:
                item = await stream.queue.get()
                stream.taken += 1
                if stream.paused and stream.unread <= self.config.resume_chunks:
                    with self._cv:  # the core thread may be idle with only paused work
                        self._cv.notify()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = item.finish_reason is not None
                yield item
                if done:
                    return
        finally:
            self._streams.pop(rid, None)
            if not done:  # consumer went away (GeneratorExit / CancelledError): free blocks now
                self._submit("abort", rid)

    def _prepare(self, request: GenerationRequest) -> CoreRequest:
        """All validation that needs the tokenizer; raises InvalidRequestError before any chunk."""
        assert self.tokenizer is not None and self.core is not None
        try:
            if request.messages:
                ids = self.tokenizer.encode_chat([(m.role, m.content) for m in request.messages])
            else:
                ids = self.tokenizer.encode(request.prompt or "")
        except InvalidRequestError:
            raise
        except Exception as e:  # template errors (e.g. a role order the template rejects)
            raise InvalidRequestError(f"cannot tokenize the request: {e}") from e
        if not ids:
            raise InvalidRequestError("the prompt tokenizes to zero tokens")
        p = request.sampling
        resume = [int(t) for t in request.resume_token_ids]
        if any(not 0 <= t < self._vocab_size for t in resume):
            raise InvalidRequestError(f"resume_token_ids must be in [0, {self._vocab_size})")
        total = len(ids) + p.max_tokens
        if total > self._max_context:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({p.max_tokens}) = {total} exceeds the "
                f"context of {self._max_context} tokens")
        blocks = self.core.blocks
        need = -(-total // blocks.block_size)
        if need > blocks.num_blocks:
            raise InvalidRequestError(
                f"request needs {need} KV blocks but the pool holds {blocks.num_blocks}; lower max_tokens")
        return CoreRequest(request_id="", prompt_ids=ids, sampling=p, priority=int(request.priority),
                           resume_ids=resume, deadline=request.deadline, timeline=request.timeline)

    async def on_core_thread(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the step thread between steps (what touches the block manager must)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[T] = loop.create_future()

        def call() -> None:
            try:
                out = fn()
            except Exception as e:  # noqa: BLE001 - handed to the caller
                loop.call_soon_threadsafe(done.set_exception, e)
            else:
                loop.call_soon_threadsafe(done.set_result, out)
        if self._thread is None:
            raise EngineUnavailableError(f"model {self.model_name!r} is not loaded")
        self._submit("call", call)
        return await done

    # ---- core thread ---------------------------------------------------------------------------
    def _submit(self, kind: str, payload: object) -> None:
        with self._cv:
            self._inbox.append((kind, payload))
            self._cv.notify()

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    def _deliver(self, outputs: Sequence[tuple[str, object]]) -> None:
        """Hand one step's chunks to their consumers: one wake-up per event loop per step, not per
        chunk (at batch 64 the loop thread otherwise wakes 64 times a step and competes with the
        step's OpenMP threads for the cores)."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, object]]] = {}
        for rid, item in outputs:
            final = isinstance(item, BaseException) or getattr(item, "finish_reason", None) is not None
            stream = self._streams.pop(rid, None) if final else self._streams.get(rid)
            if stream is not None:
                stream.sent += 1
                by_loop.setdefault(stream.loop, []).append((stream.queue, item))
        for loop, items in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the consumer's loop is closed
                loop.call_soon_threadsafe(_put_all, items)

    def _apply_backpressure(self, core: EngineCore) -> None:
        """Pause requests whose consumers fell behind; resume those that caught up."""
        cfg = self.config
        for rid, stream in list(self._streams.items()):
            unread = stream.unread
            if not stream.paused and unread >= cfg.pause_chunks:
                stream.paused = True
                core.set_paused(rid, True)
            elif stream.paused and unread <= cfg.resume_chunks:
                stream.paused = False
                core.set_paused(rid, False)

    def _run(self) -> None:
        core = self.core
        assert core is not None
        while True:
            self._apply_backpressure(core)
            with self._cv:
                while not self._inbox and not core.has_runnable() and not core.has_unpins() and not self._shutdown:
                    # only paused work left: wake on a consumer's notify, or soon to expire deadlines
                    self._cv.wait(timeout=0.1 if core.has_work() else None)
                    self._apply_backpressure(core)
                if self._shutdown:
                    return
                inbox, self._inbox = self._inbox, []
            for kind, payload in inbox:
                if kind == "add":
                    core.add_request(payload)  # type: ignore[arg-type]
                elif kind == "call":
                    payload()  # type: ignore[operator]
                else:
                    core.abort(payload)  # type: ignore[arg-type]
            try:
                outputs = core.step()
            except Exception as e:  # scheduler/sampler bug: fail everything rather than hang clients
                log.exception("engine step failed")
                self._deliver([(rid, EngineUnavailableError(f"engine step failed: {e}")) for rid in core.abort_all()])
                continue
            self._deliver(outputs)


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
