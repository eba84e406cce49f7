"""The torch engine's cache identity and its links to the shared cache.

Identity: the model's namespace (services/cache/keys.py) from the weights' SHA-256, the dtype, the
pool layout and page size, and the options that change KV values; so only engines that compute
identical KV share keys. Links: the KV event log fed by the block manager, the shared tier (when
the server has a store and `shared_kv` is on), the tokenizer files routers fetch to compute the
same keys, and the prefetch that runs before a request enters the step loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
from collections.abc import Sequence

import torch

from services.cache import events, keys, metrics, runtime
from services.cache.block_format import BlockShape
from services.cache.kv_tier import BlockRef, KvTier
from services.cache.prompt_tokens import common_prefix, files_digest

from ..engine.base import GenerationRequest
from .block_manager import BlockManager
from .config import TorchEngineConfig
from .engine_core import CacheKeying
from .kv_cache import KVCache
from .tokenizer import Tokenizer
from .weights import ModelArgs

LAYOUT = "paged-head-major:k[L,N,KV,hd,B]v[L,N,KV,B,hd]"
_digests: dict[tuple[str, int, int], str] = {}


def weights_digest(path: str) -> str:
    """SHA-256 of the checkpoint's bytes (a .gguf file, or a folder's weight and config files),
    remembered per (path, size, mtime) so reloading does not read the weights twice."""
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path)
        if f.endswith((".safetensors", ".gguf", ".json", ".bin", ".model")))
    stat_key = (path, sum(os.path.getsize(f) for f in files), int(max(os.path.getmtime(f) for f in files)))
    if stat_key in _digests:
        return _digests[stat_key]
    h = hashlib.sha256()
    for name in files:
        h.update(os.path.basename(name).encode() + b"\0")
        with open(name, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    _digests[stat_key] = h.hexdigest()
    return _digests[stat_key]


def tokenizer_files(tokenizer: Tokenizer) -> tuple[dict[str, bytes], str]:
    """The tokenizer in Hugging Face files, and their digest."""
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save(folder)
        files = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name), "rb") as f:
                files[name] = f.read()
    return files, files_digest(files)


class EngineCache:
    def __init__(self, model: str, path: str, args: ModelArgs, dtype: torch.dtype, cfg: TorchEngineConfig,
                 kv: KVCache, blocks: BlockManager, tokenizer: Tokenizer) -> None:
        self.model = model
        self.block_size = kv.block_size
        self.tokenizer = tokenizer
        numerics = (f"int8={cfg.int8_max_tokens};invariant={cfg.invariant_rows if cfg.batch_invariant else 0}"
                    + ("" if cfg.kv_cache_dtype == "auto" else f";kv={cfg.kv_cache_dtype}"))
        self.weights_digest = weights_digest(path)
        self.namespace = keys.namespace(self.weights_digest, str(dtype), LAYOUT, kv.block_size, numerics)
        self.events = events.EventLog()
        self.local_stats = metrics.tier_stats(model, "local")
        self.blocks = blocks
        blocks.listener = self._on_blocks
        self.tokenizer_files, self.tokenizer_digest = tokenizer_files(tokenizer)
        store = runtime.store()
        self.tier: KvTier | None = None
        if store is not None and cfg.shared_kv:
            shape = BlockShape(kv.k.dtype, kv.block_size, args.num_layers, args.num_kv_heads, args.head_dim)
            self.tier = KvTier(store, model, self.namespace, shape, kv.pools, self.events)

    def _on_blocks(self, kind: str, block_keys: list[bytes]) -> None:
        self.events.record(kind, events.LOCAL, block_keys)
        if kind == events.REMOVED:
            self.local_stats.evicted(len(block_keys))
        self.local_stats.blocks = self.blocks.num_cached

    def keying(self, request: GenerationRequest, ids: Sequence[int]) -> CacheKeying:
        """The request's key chain: tenant salt, and the public system prompt's blocks if opted in."""
        public = 0
        if request.share_system_prompt and request.messages:
            system = []
            for m in request.messages:
                if m.role != "system":
                    break
                system.append((m.role, m.content))
            if system:
                sys_ids = self.tokenizer.encode_chat(system, add_generation_prompt=False)
                public = common_prefix(sys_ids, ids) // self.block_size
        return CacheKeying(self.namespace, runtime.salt(request.tenant), public)

    async def prefetch(self, keying: CacheKeying, ids: Sequence[int]) -> tuple[int, list] | None:
        """Look the prompt's full blocks up locally, then fetch those after the local hit from the
        shared tier (off the step loop). Returns (first block index, [(k, v)]) or None."""
        bs = self.block_size
        n_blocks = (len(ids) - 1) // bs  # the last token is always computed
        if n_blocks == 0:
            return None
        chain = keys.chain(keying.root, ids[:n_blocks * bs], bs, keying.salt, keying.public_blocks)
        local = len(self.blocks.match_prefix(chain))  # a read of a dict the step thread owns: a hint
        self.local_stats.hit(local)
        self.local_stats.miss(n_blocks - local)
        if local == n_blocks or self.tier is None:
            return None
        refs = [BlockRef(chain[i], chain[i - 1] if i else keying.root,
                         keys.PUBLIC_SALT if i < keying.public_blocks else keying.salt,
                         tuple(ids[i * bs:(i + 1) * bs])) for i in range(local, n_blocks)]
        data = await asyncio.to_thread(self.tier.fetch, refs)
        return (local, data) if data else None

    def flush_local(self) -> int:
        """Drop every unreferenced cached block of the pool (meshctl cache flush)."""
        return len(self.blocks.drop_cached())

    def close(self) -> None:
        if self.tier is not None:
            self.tier.close()
