"""The simulated engine: deterministic, fast, no model.

It exists for routing, failover and load tests. It batches like a real engine (a bounded running
set, a priority-ordered waiting queue, KV blocks that grow with each token) but its "output" echoes
the prompt's words, so it is always reported as simulated and never stands in for model results.
Output token i depends only on the prompt and i, so a migrated request resumes seamlessly.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import os
import random
import time
import zlib
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import asdict, dataclass

from .base import (
    CapacityError,
    Engine,
    EngineLoad,
    EngineUnavailableError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    Priority,
    Usage,
)
from .options import check_values

SIM_EOS = 0
SIM_VOCAB = 32000
#: Running slots beyond max_running that only CRITICAL requests may take.
CRITICAL_RESERVE = 2
#: A sequence whose consumer has not pulled its last chunk for this long is paused.
PAUSED_AFTER_S = 0.5


@dataclass(frozen=True)
class SimConfig:
    tokens_per_second: float = 200.0  # per sequence, while decoding
    first_token_latency_s: float = 0.01
    prefill_tokens_per_second: float = 20_000.0
    max_running: int = 32
    max_waiting: int = 512
    block_size: int = 16
    kv_blocks_total: int = 4096
    max_context: int = 2048
    # Fault injection for failure tests: while this file exists, generation hangs (the process,
    # its lease and its gRPC health service stay up), like a wedged engine.
    hang_file: str = ""
    # Fault injection for traffic tests (canary rollback, fallback): from error_after_s after the
    # start, this share of requests fails with UNAVAILABLE before its first token.
    error_rate: float = 0.0
    error_after_s: float = 0.0
    # A model that takes time to load (rollout tests: no traffic may reach it before READY).
    load_s: float = 0.0

    def __post_init__(self) -> None:
        """Refuse values the engine cannot run with (tokens_per_second=0 would divide by zero
        on every request); the ranges live in the option schema."""
        check_values("sim", asdict(self))


def _words(request: GenerationRequest) -> list[str]:
    text = " ".join(m.content for m in request.messages) if request.messages else request.prompt or ""
    return text.split() or ["."]


def _token_id(word: str) -> int:
    return 1 + zlib.crc32(word.encode()) % (SIM_VOCAB - 1)


class SimEngine(Engine):
    backend = "sim"
    simulated = True

    def __init__(self, model_name: str, config: SimConfig | None = None) -> None:
        super().__init__(model_name)
        self.config = config or SimConfig()
        self._ready = False
        self._running: dict[str, int] = {}  # request id -> tokens held in KV
        # (priority, arrival, future, request id, prompt tokens); a slot is handed over on release.
        self._waiting: list[tuple[int, int, asyncio.Future, str, int]] = []
        self._seq = itertools.count()
        self._emitted: deque[float] = deque(maxlen=4096)
        # request id -> when it handed its last chunk over and waits for the consumer to pull.
        self._handed_over: dict[str, float] = {}
        self._pump: asyncio.Task | None = None
        self._started_at = time.monotonic()

    async def start(self) -> None:
        if self.config.load_s:
            await asyncio.sleep(self.config.load_s)
        self._ready = True
        self._started_at = time.monotonic()
        self._pump = asyncio.get_running_loop().create_task(self._admit_behind_paused(), name="sim-pump")

    async def stop(self) -> None:
        self._ready = False
        if self._pump is not None:
            self._pump.cancel()
        for _, _, fut, _, _ in self._waiting:
            if not fut.done():
                fut.set_exception(EngineUnavailableError("engine stopped"))
        self._waiting.clear()

    @property
    def ready(self) -> bool:
        return self._ready

    @property
    def max_context(self) -> int:
        return self.config.max_context

    def load(self) -> EngineLoad:
        now = time.monotonic()
        while self._emitted and now - self._emitted[0] > 1.0:
            self._emitted.popleft()
        bs = self.config.block_size
        used = sum(math.ceil(n / bs) for n in self._running.values())
        return EngineLoad(
            queue_depth=len(self._waiting), running=self._busy(now),
            kv_blocks_used=min(used, self.config.kv_blocks_total),
            kv_blocks_total=self.config.kv_blocks_total, max_running=self.config.max_running,
            tokens_per_second=float(len(self._emitted)))

    def _validate(self, request: GenerationRequest) -> list[str]:
        words = _words(request)
        total = len(words) + request.sampling.max_tokens
        if total > self.config.max_context:
            raise InvalidRequestError(
                f"prompt ({len(words)} tokens) + max_tokens ({request.sampling.max_tokens}) = {total} "
                f"exceeds the model context of {self.config.max_context} tokens")
        return words

    async def _admit(self, request: GenerationRequest, rid: str, tokens: int) -> None:
        """Take a running slot now, or wait for one in priority order. CRITICAL work (the control
        plane's liveness probe among it) may use CRITICAL_RESERVE slots beyond max_running, so
        streams whose clients stopped reading cannot starve it."""
        limit = self.config.max_running + (CRITICAL_RESERVE if request.priority == Priority.CRITICAL else 0)
        if self._busy() < limit and (not self._waiting or request.priority == Priority.CRITICAL):
            self._running[rid] = tokens
            return
        if len(self._waiting) >= self.config.max_waiting:
            raise CapacityError(f"engine queue is full ({self.config.max_waiting} waiting)")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (int(request.priority), next(self._seq), fut, rid, tokens)
        heapq.heappush(self._waiting, entry)
        try:
            await fut
        except BaseException:
            if entry in self._waiting:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
            else:
                self._release(rid)  # the slot was handed over just as we were cancelled
            raise

    def _busy(self, now: float | None = None) -> int:
        """Running sequences that compute: one whose consumer stopped pulling (its client stopped
        reading and flow control paused it) keeps its KV but frees its compute slot."""
        now = time.monotonic() if now is None else now
        paused = sum(1 for t in self._handed_over.values() if now - t > PAUSED_AFTER_S)
        return len(self._running) - paused

    async def _admit_behind_paused(self) -> None:
        """Sequences pause without an event; let waiters take the slots they free."""
        while True:
            await asyncio.sleep(PAUSED_AFTER_S / 2)
            if self._waiting:
                self._release("")

    def _release(self, request_id: str) -> None:
        self._running.pop(request_id, None)
        while self._waiting and self._busy() < self.config.max_running:
            _, _, fut, rid, tokens = heapq.heappop(self._waiting)
            if not fut.done():
                self._running[rid] = tokens
                fut.set_result(None)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if not self._ready:
            raise EngineUnavailableError(f"model {self.model_name} is not loaded")
        words = self._validate(request)
        cfg = self.config
        if cfg.hang_file != "" and await asyncio.to_thread(os.path.exists, cfg.hang_file):
            await asyncio.Event().wait()  # until the caller gives up and cancels
        if cfg.error_rate and time.monotonic() - self._started_at >= cfg.error_after_s \
                and random.random() < cfg.error_rate:
            raise EngineUnavailableError(f"injected fault: error_rate={cfg.error_rate:g} on {self.model_name}")
        rid = f"{request.request_id}#{next(self._seq)}"
        await self._admit(request, rid, len(words))
        request.timeline.scheduled()
        start = len(request.resume_token_ids)
        completion = start
        tail = ""  # enough of the text to find a stop string that ends in the next piece
        keep_chars = max((len(x) for x in request.sampling.stop), default=1)
        try:
            await asyncio.sleep(cfg.first_token_latency_s + len(words) / cfg.prefill_tokens_per_second)
            for i in range(start, request.sampling.max_tokens):
                if request.deadline is not None and time.monotonic() > request.deadline:
                    yield GenerationChunk("", [], finish_reason=FinishReason.CANCELLED,
                                          usage=Usage(len(words), completion))
                    return
                word = words[i % len(words)]
                piece = word if i == 0 else " " + word
                completion += 1
                self._running[rid] = len(words) + completion
                self._emitted.append(time.monotonic())
                tail += piece
                stop_hit = next((s for s in request.sampling.stop if s in tail), None)
                if stop_hit is not None:
                    cut = tail.index(stop_hit)
                    keep = piece[: max(0, len(piece) - (len(tail) - cut))]
                    yield GenerationChunk(keep, [], finish_reason=FinishReason.STOP,
                                          usage=Usage(len(words), completion))
                    return
                tail = tail[-(keep_chars - 1):] if keep_chars > 1 else ""
                tid = _token_id(word)
                last = i + 1 == request.sampling.max_tokens
                self._handed_over[rid] = time.monotonic()
                yield GenerationChunk(
                    piece, [tid], [-0.0] if request.sampling.logprobs else [],
                    finish_reason=FinishReason.LENGTH if last else None,
                    usage=Usage(len(words), completion) if last else None)
                self._handed_over.pop(rid, None)
                if not last:
                    await asyncio.sleep(1.0 / cfg.tokens_per_second)
        finally:
            self._handed_over.pop(rid, None)
            self._release(rid)
