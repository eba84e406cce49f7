"""What each replica probably has in its prefix cache, from what this router sent it.

The router has no tokenizer, so it approximates an engine's token blocks with fixed-size blocks
of the rendered prompt's characters (64 characters, about 16 tokens of English, about one KV
block) and hashes them as a chain: block i's hash covers blocks 0..i (blake2b: the same in every
router process, where Python's hash() is seeded per process), so a match means the whole prefix
up to that block is the same, as in the engine's own cache.
Chat requests are rendered as role and content per message with separators, so a conversation's
next turn extends the previous turn's rendering.

Each replica (server, model) keeps an LRU of recently sent block hashes. The record is a guess:
the server may have evicted blocks, another router may have warmed it, and a restarted router
starts empty. A
wrong guess costs only speed (one prefill), never correctness, and the record rebuilds itself as
traffic flows.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

DEFAULT_BLOCK_CHARS = 64
DEFAULT_CAPACITY_BLOCKS = 16_384  # per server: about 256k tokens of prefixes


class ChatMessage(Protocol):
    """What render reads of a chat message (the proto and the engine type both fit)."""

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


def render(prompt: str, messages: Sequence[ChatMessage]) -> str:
    """The text whose prefix the engine would share: the prompt, or each message's role+content."""
    if prompt:
        return prompt
    return "".join(f"\x1e{m.role}\x1f{m.content}" for m in messages)


def block_hashes(text: str, block_chars: int = DEFAULT_BLOCK_CHARS) -> list[int]:
    """Chained hashes of the full blocks (a partial last block is never cached by engines)."""
    out: list[int] = []
    h = b""
    for start in range(0, len(text) - block_chars + 1, block_chars):
        h = hashlib.blake2b(h + text[start:start + block_chars].encode("utf-8", "surrogatepass"),
                            digest_size=8).digest()
        out.append(int.from_bytes(h, "little"))
    return out


class PrefixIndex:
    """Per-replica LRU of block hashes this router sent there (keyed by replica id)."""

    def __init__(self, block_chars: int = DEFAULT_BLOCK_CHARS,
                 capacity_blocks: int = DEFAULT_CAPACITY_BLOCKS) -> None:
        if block_chars < 1 or capacity_blocks < 1:
            raise ValueError("block_chars and capacity_blocks must be >= 1")
        self.block_chars = block_chars
        self.capacity_blocks = capacity_blocks
        self._replicas: dict[str, OrderedDict[int, None]] = {}

    def match(self, replica_id: str, hashes: Sequence[int]) -> int:
        """Leading blocks of `hashes` the replica probably holds."""
        blocks = self._replicas.get(replica_id)
        if not blocks:
            return 0
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def record(self, replica_id: str, hashes: Sequence[int]) -> None:
        blocks = self._replicas.setdefault(replica_id, OrderedDict())
        for h in hashes:
            if h in blocks:
                blocks.move_to_end(h)
            else:
                blocks[h] = None
        while len(blocks) > self.capacity_blocks:
            blocks.popitem(last=False)

    def forget(self, replica_id: str) -> None:
        """A replica that left lost its cache (or will be a new engine when it returns)."""
        self._replicas.pop(replica_id, None)

    def replicas(self) -> set[str]:
        return set(self._replicas)
