"""The response cache: a deterministic request seen before is answered from the shared store.

Deterministic means greedy (temperature 0) or seeded, and not a resume. The key is SHA-256 over the
engine's identity (its KV namespace: weights digest, dtype and the options that change numerics,
so a new model version never serves an old answer), the tenant's salt and the canonical request
(prompt or messages, every sampling field, in a fixed JSON form). A request may opt out
(`bypass_response_cache`). Only answers that ended by STOP or LENGTH are stored; a store that is
down or full makes the server generate as before.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from dataclasses import dataclass, field

from services.cache import metrics, runtime
from services.cache.keys import store_key
from services.cache.store import Store

from .engine.base import FinishReason, GenerationChunk, GenerationRequest, Usage

log = logging.getLogger(__name__)

KIND = "resp1"
MAX_ANSWER_BYTES = 4 << 20
_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length"}


def deterministic(req: GenerationRequest) -> bool:
    s = req.sampling
    return not req.resume_token_ids and (s.temperature == 0 or s.seed is not None)


def canonical(req: GenerationRequest) -> bytes:
    """The request's answer-determining fields in one fixed form (ids and deadlines excluded)."""
    s = req.sampling
    body = {
        "prompt": req.prompt,
        "messages": [[m.role, m.content] for m in req.messages] if req.messages else None,
        "sampling": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                     "seed": s.seed, "stop": list(s.stop), "stop_token_ids": list(s.stop_token_ids),
                     "logprobs": s.logprobs},
    }
    return json.dumps(body, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode()


def engine_identity(engine: object) -> bytes | None:
    """What names the engine's numerics: the torch engine's KV namespace; the sim engine's config
    (its echo is deterministic); None for backends whose numerics we cannot name (no caching)."""
    cache = getattr(engine, "cache", None)
    ns = getattr(cache, "namespace", None)
    if isinstance(ns, bytes):
        return ns
    if getattr(engine, "backend", "") == "sim":
        return hashlib.sha256(b"sim:" + repr(getattr(engine, "config", None)).encode()).digest()
    return None


@dataclass
class Recorder:
    """Collects one generation's chunks; `answer()` is the stored form once it finished cleanly."""

    name: str
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None
    usage: Usage | None = None

    def add(self, chunk: GenerationChunk) -> None:
        self.text.append(chunk.text)
        self.token_ids.extend(chunk.token_ids)
        self.logprobs.extend(chunk.logprobs)
        if chunk.finish_reason is not None:
            self.finish, self.usage = chunk.finish_reason, chunk.usage

    def answer(self) -> bytes | None:
        if self.finish not in _FINISH or self.usage is None:
            return None
        data = json.dumps({"v": 1, "text": "".join(self.text), "token_ids": self.token_ids,
                           "logprobs": self.logprobs, "finish": _FINISH[self.finish],
                           "prompt_tokens": self.usage.prompt_tokens,
                           "completion_tokens": self.usage.completion_tokens}).encode()
        return data if len(data) <= MAX_ANSWER_BYTES else None


def _chunk(data: bytes) -> GenerationChunk | None:
    try:
        d = json.loads(data)
        if d.get("v") != 1:
            return None
        finish = FinishReason.STOP if d["finish"] == "stop" else FinishReason.LENGTH
        usage = Usage(int(d["prompt_tokens"]), int(d["completion_tokens"]), int(d["prompt_tokens"]))
        return GenerationChunk(text=str(d["text"]), token_ids=[int(t) for t in d["token_ids"]],
                               logprobs=[float(x) for x in d["logprobs"]], finish_reason=finish, usage=usage,
                               cached=True)
    except (ValueError, KeyError, TypeError):
        return None


class ResponseCache:
    def __init__(self, max_writes_in_flight: int = 8) -> None:
        self._writes = 0
        self._max_writes = max_writes_in_flight
        self._tasks: set[asyncio.Task] = set()

    @staticmethod
    def _store() -> Store | None:
        return runtime.store()

    def key(self, engine: object, req: GenerationRequest) -> str | None:
        """The store key for this request on this engine, or None when it must not be cached."""
        if req.bypass_response_cache or not deterministic(req) or self._store() is None:
            return None
        identity = engine_identity(engine)
        if identity is None:
            return None
        salt = runtime.salt(req.tenant)
        digest = hashlib.sha256(identity + salt + canonical(req)).digest()
        return store_key(KIND, identity, salt, digest)

    async def lookup(self, model: str, name: str) -> GenerationChunk | None:
        store = self._store()
        if store is None:
            return None
        stats = metrics.tier_stats(model, "response")
        if not store.available():
            stats.error("store_down")
            return None
        data = (await asyncio.to_thread(store.get_many, [name]))[0]
        chunk = _chunk(data) if data is not None else None
        if chunk is None:
            stats.miss()
            return None
        stats.hit(1, len(data or b""))
        return chunk

    def save(self, model: str, rec: Recorder) -> None:
        """Store the answer in the background; dropped (counted) when too many writes are pending."""
        store, data = self._store(), rec.answer()
        if store is None or data is None:
            return
        stats = metrics.tier_stats(model, "response")
        if self._writes >= self._max_writes:
            stats.error("write_dropped")
            return
        self._writes += 1

        async def write() -> None:
            try:
                ok = await asyncio.to_thread(store.set_many, {rec.name: data})
                stats.wrote(len(data)) if ok else stats.error("store_full" if store.up else "store_down")
            finally:
                self._writes -= 1
        task = asyncio.get_running_loop().create_task(write())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
