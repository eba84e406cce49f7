"""A fake of TensorRT-LLM's LLM API that behaves as the real one is documented to, on CPU.

Its classes are built from the recorded contract (services/modelserver/trtllm/contract.json), so a
name our mapping uses that the pinned version lacks fails here as it would on a GPU. Behaviour
copied from TensorRT-LLM's documentation and executor/result.py:
- streamed outputs are the same object, mutated: `outputs[0].text` and `.token_ids` cumulative;
- stop strings are matched as token sequences (each stop string encoded by the tokenizer), so a
  stop string the model spells with other tokens is not seen; the text is cut and the stop word's
  token ids trimmed only in the final output (`finish_reason` "stop", `stop_reason` the string);
- `abort()` ends the request with a final "cancelled" output; errors are raised from the iterator;
- a waiting queue ordered by priority only with SchedulerConfig(waiting_queue_policy=PRIORITY);
- get_stats_async / get_kv_cache_events_async yield dicts and end after `timeout` without data.

The "model" is a successor table over a small vocabulary: the next token depends only on the last
one, so greedy decoding is deterministic and a resumed request continues exactly.
"""

from __future__ import annotations

import asyncio
import enum
import json
from dataclasses import dataclass, field, make_dataclass
from typing import Any

from services.modelserver.trtllm.api import TrtApi
from services.modelserver.trtllm.contract import recorded_names

STORY = [" The", " cat", " sat", " on", " the", " mat", ".", " Then", " it", " said", " E", "ND", " and",
         " went", " home", "!", " Caf", "\u00e9", " time", "\n"]
SPECIAL = ["<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
CHARS = [chr(c) for c in range(32, 127)]
PIECES = SPECIAL + STORY + [c for c in CHARS if c not in STORY]


class FakeTokenizer:
    """Greedy longest-match over PIECES; decode joins them."""

    def __init__(self) -> None:
        self.ids = {p: i for i, p in enumerate(PIECES)}
        self.vocab_size = len(PIECES)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        out, i = ([0] if add_special_tokens else []), 0
        by_len = sorted(self.ids, key=len, reverse=True)
        while i < len(text):
            piece = next((p for p in by_len if text.startswith(p, i)), None)
            if piece is None:
                raise ValueError(f"cannot encode {text[i]!r}")
            out.append(self.ids[piece])
            i += len(piece)
        return out

    def decode(self, ids: list[int]) -> str:
        return "".join(PIECES[i] for i in ids if i >= len(SPECIAL))

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        body = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return body + ("<|assistant|>" if add_generation_prompt else "")


def next_token(last: int) -> int:
    piece = PIECES[last]
    i = STORY.index(piece) + 1 if piece in STORY else 0
    return PIECES.index(STORY[i % len(STORY)])


class RequestError(RuntimeError):
    """tensorrt_llm.executor.utils.RequestError's role: the request itself is bad."""


class WaitingQueuePolicy(enum.StrEnum):
    FCFS = "fcfs"
    PRIORITY = "priority"


def _config_class(name: str, section: str, defaults: dict[str, Any]) -> type:
    names = sorted(recorded_names(section))
    return make_dataclass(name, [(n, Any, field(default=defaults.get(n))) for n in names], kw_only=True)


FakeSamplingParams = _config_class("SamplingParams", "SamplingParams",
                                   {"max_tokens": 32, "detokenize": True, "include_stop_str_in_output": False})
FakeKvCacheConfig = _config_class("KvCacheConfig", "KvCacheConfig",
                                  {"enable_block_reuse": True, "tokens_per_block": 32, "event_buffer_max_size": 0})
FakeSchedulerConfig = _config_class("SchedulerConfig", "SchedulerConfig", {"waiting_queue_policy": "fcfs"})
FakeLlmArgs = _config_class("TorchLlmArgs", "LlmArgs", {})


@dataclass
class Logprob:
    logprob: float
    rank: int = 1


@dataclass
class CompletionOutput:
    index: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class FakeResult:
    """GenerationResult/RequestOutput: iterate it for the same object, updated per step."""

    def __init__(self, llm: FakeLLM, prompt_ids: list[int], params: Any, priority: float, salt: str | None) -> None:
        self.llm, self.prompt_token_ids, self.params, self.priority = llm, prompt_ids, params, priority
        self.salt = salt
        self.request_id = next(llm.ids)
        self.outputs = [CompletionOutput()]
        self.finished = False
        self.cached_tokens = 0
        self.queue: asyncio.Queue = asyncio.Queue()
        self._aborted = False
        self.all_ids = list(prompt_ids)  # prompt + generated, as the KV cache holds them

    def abort(self) -> None:
        self._aborted = True
        self.llm.wake()

    def aborted(self) -> bool:
        return self._aborted

    def __aiter__(self) -> FakeResult:
        return self

    async def __anext__(self) -> FakeResult:
        if self.finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.outputs[0], self.finished = item
        return self


class _Drain:
    """IterationResult: yields what was queued, ends after `timeout` s without data."""

    def __init__(self, queue: asyncio.Queue, timeout: float) -> None:
        self.queue, self.timeout = queue, timeout

    def __aiter__(self) -> _Drain:
        return self

    async def __anext__(self) -> Any:
        try:
            return json.loads(await asyncio.wait_for(self.queue.get(), self.timeout))
        except TimeoutError:
            raise StopAsyncIteration from None


class FakeLLM:
    """tensorrt_llm.LLM on the PyTorch backend, reduced to what MeshServe calls."""

    step_s = 0.002  # one decoding iteration
    instances: list[FakeLLM] = []

    def __init__(self, model: str, **kwargs: Any) -> None:
        FakeLlmArgs(**kwargs)  # unknown argument names fail as the real (strict) LlmArgs does
        self.model, self.kwargs = model, kwargs
        self.tokenizer = FakeTokenizer()
        kv = kwargs.get("kv_cache_config") or FakeKvCacheConfig()
        sched = kwargs.get("scheduler_config")
        self.priority_queue = sched is not None and str(sched.waiting_queue_policy) == "priority"
        self.block = kv.tokens_per_block or 32
        self.events_on = bool(kv.event_buffer_max_size)
        self.max_batch = kwargs.get("max_batch_size", 256)
        self.max_seq_len = kwargs.get("max_seq_len", 4096)
        self.max_num_tokens = kwargs.get("max_num_tokens", 8192)
        self.chunked = kwargs.get("enable_chunked_prefill", False)
        self.stats_on = kwargs.get("enable_iter_perf_stats", False)
        self.ids = iter(range(1, 1 << 30))
        self.waiting: list[FakeResult] = []
        self.running: list[FakeResult] = []
        self.cached: dict[int, None] = {}  # block hash -> None, oldest first
        self.max_cached = 64
        self.reused = self.missed = 0
        self.admitted: list[float] = []  # priorities in admission order (priority tests)
        self.stats_q: asyncio.Queue = asyncio.Queue()
        self.events_q: asyncio.Queue = asyncio.Queue()
        self.event_id = 0
        self.hold = False  # tests pause the "GPU" to pile up a queue
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task | None = None
        self.shut = False
        FakeLLM.instances.append(self)

    # ---- the public API ---------------------------------------------------------------------
    def generate_async(self, inputs: Any, sampling_params: Any = None, lora_request: Any = None,
                       prompt_adapter_request: Any = None, streaming: bool = False,
                       kv_cache_retention_config: Any = None, disaggregated_params: Any = None,
                       trace_headers: Any = None, _postproc_params: Any = None, scheduling_params: Any = None,
                       conversation_params: Any = None, cache_salt: str | None = None,
                       priority: float = 0.5) -> FakeResult:
        if self.shut:
            raise RuntimeError("LLM is shutting down")
        params = sampling_params or FakeSamplingParams()
        ids = list(inputs)
        if not 0.0 <= priority <= 1.0:
            raise ValueError(f"priority must be in [0, 1], got {priority}")
        if len(ids) + params.max_tokens > self.max_seq_len:
            raise ValueError(f"prompt length {len(ids)} + max_tokens exceeds max_seq_len {self.max_seq_len}")
        if not self.chunked and len(ids) > self.max_num_tokens:
            raise ValueError(f"prompt length {len(ids)} exceeds max_num_tokens {self.max_num_tokens}")
        result = FakeResult(self, ids, params, priority, cache_salt)
        self.waiting.append(result)
        self.wake()
        if self._loop_task is None:
            self._loop_task = asyncio.get_running_loop().create_task(self._run())
        return result

    def get_stats_async(self, timeout: float = 2) -> _Drain:
        return _Drain(self.stats_q, timeout)

    def get_kv_cache_events_async(self, timeout: float = 2) -> _Drain:
        return _Drain(self.events_q, timeout)

    def shutdown(self) -> None:
        """Called from a worker thread (asyncio.to_thread), as the engine calls the real one."""
        self.shut = True
        task = self._loop_task
        if task is not None:
            task.get_loop().call_soon_threadsafe(task.cancel)

    # ---- the "executor" ---------------------------------------------------------------------
    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while True:
            if not (self.waiting or self.running) or self.hold:
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(self.step_s)
            self._admit()
            for r in list(self.running):
                self._step(r)
            if self.stats_on:
                self._stats()

    def _admit(self) -> None:
        for r in [r for r in self.waiting if r.aborted()]:
            self.waiting.remove(r)
            self._finish(r, "cancelled")
        order = sorted(self.waiting, key=lambda r: -r.priority) if self.priority_queue else list(self.waiting)
        for r in order[: max(0, self.max_batch - len(self.running))]:
            self.waiting.remove(r)
            self.running.append(r)
            self.admitted.append(r.priority)
            self._prefill(r)

    def _prefill(self, r: FakeResult) -> None:
        full = len(r.prompt_token_ids) // self.block
        hits = 0
        for b in range(full):
            h = self._hash(r, (b + 1) * self.block)
            if h in self.cached and hits == b:
                hits += 1
            else:
                self._store(r, b)
        self.reused += hits
        self.missed += full - hits
        r.cached_tokens = hits * self.block

    def _step(self, r: FakeResult) -> None:
        if r.aborted():
            return self._finish(r, "cancelled")
        if "CRASH" in self.tokenizer.decode(r.prompt_token_ids) and len(r.outputs[0].token_ids) >= 2:
            self.running.remove(r)
            return r.queue.put_nowait(RuntimeError("executor worker died"))
        if "BADREQ" in self.tokenizer.decode(r.prompt_token_ids):
            self.running.remove(r)
            return r.queue.put_nowait(RequestError("request failed validation in the executor"))
        out = r.outputs[0]
        tok = next_token(r.all_ids[-1])
        r.all_ids.append(tok)
        if len(r.all_ids) % self.block == 0:
            self._store(r, len(r.all_ids) // self.block - 1)
        ids = [*out.token_ids, tok]
        lps = [*out.logprobs, {tok: Logprob(-0.25)}] if r.params.logprobs else []
        reason, stop_reason, trimmed = self._stop_check(r, ids)
        if reason is None and len(ids) >= r.params.max_tokens:
            reason = "length"
        if reason is None:
            r.queue.put_nowait((CompletionOutput(0, self.tokenizer.decode(ids), ids, lps), False))
            return None
        self.running.remove(r)
        text = self.tokenizer.decode(trimmed)
        r.queue.put_nowait((CompletionOutput(0, text, trimmed, lps, reason, stop_reason), True))
        return None

    def _stop_check(self, r: FakeResult, ids: list[int]) -> tuple[str | None, Any, list[int]]:
        p = r.params
        if ids[-1] in (p.stop_token_ids or ()):
            return "stop", ids[-1], ids[:-1]
        for s in p.stop or ():
            word = self.tokenizer.encode(s, add_special_tokens=False)
            if ids[-len(word):] == word:
                return "stop", s, ids if p.include_stop_str_in_output else ids[:-len(word)]
        return None, None, ids

    def _finish(self, r: FakeResult, reason: str) -> None:
        if r in self.running:
            self.running.remove(r)
        out = r.outputs[0]
        r.queue.put_nowait((CompletionOutput(0, out.text, list(out.token_ids), list(out.logprobs), reason), True))

    def _hash(self, r: FakeResult, end: int) -> int:
        return hash((r.salt, tuple(r.all_ids[:end]))) & ((1 << 62) - 1)

    def _store(self, r: FakeResult, block: int) -> None:
        end = (block + 1) * self.block
        h = self._hash(r, end)
        self.cached[h] = None
        parent = self._hash(r, end - self.block) if block else None
        self._event({"type": "stored", "parent_hash": parent, "blocks": [
            {"type": "stored_block", "block_hash": h,
             "tokens": [{"type": "unique_token", "token_id": t} for t in r.all_ids[end - self.block:end]]}]})
        while len(self.cached) > self.max_cached:
            old = next(iter(self.cached))
            del self.cached[old]
            self._event({"type": "removed", "block_hashes": [old]})

    def _event(self, data: dict) -> None:
        if self.events_on:
            self.event_id += 1
            self.events_q.put_nowait(json.dumps({"event_id": self.event_id, "data": data, "window_size": 4096}))

    def _stats(self) -> None:
        total = 1024
        used = len(self.cached) + sum(len(r.all_ids) // self.block + 1 for r in self.running)
        self.stats_q.put_nowait(json.dumps({
            "numActiveRequests": len(self.running), "numQueuedRequests": len(self.waiting),
            "kvCacheStats": {"maxNumBlocks": total, "freeNumBlocks": total - used, "usedNumBlocks": used,
                             "tokensPerBlock": self.block, "reusedBlocks": self.reused,
                             "missedBlocks": self.missed}}))


def fake_api() -> TrtApi:
    return TrtApi(version="1.3.0rc27", LLM=FakeLLM, SamplingParams=FakeSamplingParams,
                  KvCacheConfig=FakeKvCacheConfig, SchedulerConfig=FakeSchedulerConfig,
                  WaitingQueuePolicy=WaitingQueuePolicy, LlmArgs=FakeLlmArgs, request_errors=(RequestError, ValueError))
