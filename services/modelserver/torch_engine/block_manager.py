"""Paged KV cache bookkeeping: a fixed pool of blocks, reference counts, and automatic prefix caching.

A full block is identified by a hash chained over its parent's hash and its own tokens, so equal
hashes mean equal KV content for the whole prefix. The hash is the canonical key of
services/cache/keys.py (SHA-256, seedless), the same on every server, so the shared tier and the
routers' indexes use it as is. Blocks nobody references stay in an LRU free
queue with their hash intact and are reused on a prefix hit; they are evicted only when a fresh
block is needed and nothing unhashed is left. The pool size is fixed at construction and never grows.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

from services.cache.keys import block_key

#: Told (kind, keys) when blocks are published ("stored") or evicted ("removed"): the KV events.
BlockListener = Callable[[str, list[bytes]], None]


def hash_block(parent: bytes | None, tokens: Sequence[int], salt: bytes = b"") -> bytes:
    """Canonical key of a full block given the key of the block before it (None: the chain's root
    is empty, as in tests; engines start at their model's namespace)."""
    return block_key(parent or b"", tokens, salt)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        # Unreferenced blocks; the front is reused first. Unhashed blocks go to the front (nothing
        # to lose), cached ones to the back (least recently freed is evicted first).
        self._free: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.lookup_tokens = 0
        self.hit_tokens = 0
        self.evictions = 0
        self.listener: BlockListener | None = None

    # ---- queries -------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (including evictable cached ones)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        """Blocks referenced by at least one sequence."""
        return self.num_blocks - len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0

    def blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def match_prefix(self, hashes: Sequence[bytes]) -> list[int]:
        """Cached blocks for the longest prefix of `hashes`; no side effects."""
        hits: list[int] = []
        if not self.enable_prefix_caching:
            return hits
        for h in hashes:
            b = self._cached.get(h)
            if b is None:
                break
            hits.append(b)
        return hits

    def can_allocate(self, num_new: int, hits: Sequence[int] = ()) -> bool:
        """Whether `num_new` fresh blocks fit after taking `hits` (free hits stop being free)."""
        taken_from_free = sum(1 for b in hits if self.ref_counts[b] == 0)
        return num_new <= len(self._free) - taken_from_free

    # ---- mutations -----------------------------------------------------------------------------
    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.lookup_tokens += num_tokens
        self.hit_tokens += num_hit_tokens

    def take_hits(self, hits: Iterable[int]) -> list[int]:
        """Reference cached blocks for a new sequence."""
        out = []
        for b in hits:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1
            out.append(b)
        return out

    def allocate(self, num_new: int) -> list[int]:
        """Hand out fresh blocks, evicting least recently freed cached ones if needed."""
        if num_new > len(self._free):
            raise RuntimeError(f"KV pool exhausted: need {num_new} blocks, {len(self._free)} free")
        out = []
        evicted: list[bytes] = []
        for _ in range(num_new):
            b, _ = self._free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self._cached.get(h) == b:
                    del self._cached[h]
                    evicted.append(h)
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            out.append(b)
        if evicted:
            self.evictions += len(evicted)
            if self.listener is not None:
                self.listener("removed", evicted)
        return out

    def free(self, block_ids: Sequence[int]) -> None:
        """Drop one reference per block; pass a sequence's table in order, its tail is evicted first."""
        for b in reversed(block_ids):
            rc = self.ref_counts[b] - 1
            if rc < 0:
                raise RuntimeError(f"block {b} freed more often than allocated")
            self.ref_counts[b] = rc
            if rc == 0:
                self._free[b] = None
                if self.block_hash[b] is None:
                    self._free.move_to_end(b, last=False)

    def commit(self, block_ids: Sequence[int], hashes: Sequence[bytes], start: int, end: int) -> None:
        """Publish blocks [start, end) of a sequence, whose KV is now fully computed, for prefix reuse."""
        self.publish(block_ids, hashes, start, end)

    def publish(self, block_ids: Sequence[int], hashes: Sequence[bytes], start: int, end: int) -> list[int]:
        """commit(), returning the indexes i in [start, end) whose block became the cached copy."""
        if not self.enable_prefix_caching:
            return []
        published: list[int] = []
        for i in range(start, end):
            b = block_ids[i]
            if self.block_hash[b] is not None:
                continue  # already published (it was a prefix hit)
            h = hashes[i]
            if h in self._cached:
                continue  # another sequence computed the same block first; keep this one private
            self.block_hash[b] = h
            self._cached[h] = b
            published.append(i)
        if published and self.listener is not None:
            self.listener("stored", [hashes[i] for i in published])
        return published

    def cached_keys(self) -> list[bytes]:
        """Every published block's key (a snapshot for KV events)."""
        return list(self._cached)

    def drop_cached(self) -> list[bytes]:
        """Unpublish every cached block nobody references (a flush); returns their keys."""
        dropped = [h for h, b in self._cached.items() if self.ref_counts[b] == 0]
        for h in dropped:
            b = self._cached.pop(h)
            self.block_hash[b] = None
            self._free.move_to_end(b, last=False)
        if dropped and self.listener is not None:
            self.listener("removed", dropped)
        return dropped
