"""TensorRT-LLM's KV-cache events on the same path as the torch engine's.

`engine.kv_events()` (kv_events.py) names blocks by TensorRT-LLM's own hashes, which no router can
compute. This bridge follows the chain of each `stored` event (parent hash, then each block's token
ids) and gives every block its canonical key (services/cache/keys.py) under a namespace of this
replica's model and block size, so the model server's load stream carries the same KvEvents as for
the torch engine and routers key requests the same way.

Limits: the namespace is built from the model path, not from a digest of the weights (TensorRT-LLM
does not share KV outside its process, so the key only has to be stable for routing); events do
not say which `cache_salt` a block was stored under, so blocks are keyed with the anonymous
tenant's salt (tenant requests may be scored as missing blocks they have: a routing cost, never a
cross-tenant hit, which TensorRT-LLM's own salted cache prevents). A `reset` clears the replica.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from services.cache import events, keys, runtime
from services.cache.prompt_tokens import files_digest
from services.common.tasks import stop_task

from .kv_events import KvEvent

log = logging.getLogger(__name__)


def _tokenizer_files(tokenizer: Any) -> dict[str, bytes]:
    """The Hugging Face files of TensorRT-LLM's tokenizer (its wrapper keeps the HF one), or {}."""
    import os
    import tempfile

    hf = getattr(tokenizer, "tokenizer", tokenizer)
    if not hasattr(hf, "save_pretrained"):
        return {}
    with tempfile.TemporaryDirectory() as folder:
        try:
            hf.save_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - routers then score by the text guess
            log.warning("cannot export the TensorRT-LLM tokenizer for routers: %s", e)
            return {}
        out = {}
        for name in os.listdir(folder):
            with open(os.path.join(folder, name), "rb") as f:
                out[name] = f.read()
        return out


class TrtKvCache:
    def __init__(self, model_path: str, block_size: int, tokenizer: Any = None) -> None:
        self.block_size = block_size
        self.namespace = keys.namespace(f"path:{model_path}", "tensorrt_llm", "trtllm-paged", block_size)
        self.events = events.EventLog()
        self.tokenizer_files = _tokenizer_files(tokenizer) if tokenizer is not None else {}
        self.tokenizer_digest = files_digest(self.tokenizer_files) if self.tokenizer_files else ""
        self._keys: dict[int, bytes] = {}
        self._task: asyncio.Task | None = None

    def apply(self, ev: KvEvent) -> None:
        if ev.kind == "reset":
            self._keys.clear()
            self.events.record(events.CLEARED, events.LOCAL)
            return
        if ev.kind == "removed":
            gone = [self._keys.pop(h) for h in ev.block_hashes if h in self._keys]
            if gone:
                self.events.record(events.REMOVED, events.LOCAL, gone)
            return
        parent = self.namespace if ev.parent_hash is None else self._keys.get(ev.parent_hash)
        if parent is None:
            return  # a chain whose start we never saw (events lost before a reset): unkeyable
        salt = runtime.salt("")
        stored = []
        for h, tokens in zip(ev.block_hashes, ev.block_tokens, strict=False):
            if len(tokens) != self.block_size:
                break  # a partial block is never shared
            parent = self._keys[h] = keys.block_key(parent, tokens, salt)
            stored.append(parent)
        if stored:
            self.events.record(events.STORED, events.LOCAL, stored)

    def follow(self, source: AsyncIterator[KvEvent]) -> None:
        async def run() -> None:
            async for ev in source:
                self.apply(ev)
        self._task = asyncio.get_running_loop().create_task(run(), name="trtllm-kv-bridge")

    async def close(self) -> None:
        await stop_task(self._task)
