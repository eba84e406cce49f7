"""Paged KV cache bookkeeping: a fixed pool of blocks, reference counts, and automatic prefix caching.

A full block is identified by a hash chained over its parent's hash and its own tokens, so equal
hashes mean equal KV content for the whole prefix. Blocks nobody references stay in an LRU free
queue with their hash intact and are reused on a prefix hit; they are evicted only when a fresh
block is needed and nothing unhashed is left. The pool size is fixed at construction and never grows.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence


def hash_block(parent: bytes | None, tokens: Sequence[int]) -> bytes:
    """Collision-resistant id of a full block given the id of the block before it (None for the first)."""
    h = hashlib.blake2b(parent or b"", digest_size=16)
    h.update(array("q", tokens).tobytes())
    return h.digest()


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
        for _ in range(num_new):
            b, _ = self._free.popitem(last=False)
            h = self.block_hash[b]
            if h is not None:
                if self._cached.get(h) == b:
                    del self._cached[h]
                self.block_hash[b] = None
            self.ref_counts[b] = 1
            out.append(b)
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
        if not self.enable_prefix_caching:
            return
        for i in range(start, end):
            b = block_ids[i]
            if self.block_hash[b] is not None:
                continue  # already published (it was a prefix hit)
            h = hashes[i]
            if h in self._cached:
                continue  # another sequence computed the same block first; keep this one private
            self.block_hash[b] = h
            self._cached[h] = b
