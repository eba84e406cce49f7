"""Scheduler-visible state of one request: its tokens, how many are in the KV cache, its blocks."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from services.cache.keys import PUBLIC_SALT

from ..engine.base import Timeline
from .block_manager import hash_block


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    token_ids: list[int]  # prompt, then resumed tokens, then generated tokens
    num_prompt_tokens: int
    max_tokens: int  # generated-token limit, resumed tokens included
    priority: int = 2  # Priority value: lower is more important
    arrival: int = 0  # admission order tie-break; kept across preemptions
    deadline: float | None = None
    status: SeqStatus = SeqStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks of token_ids
    num_committed_blocks: int = 0  # leading blocks already published to the prefix cache
    num_cached_tokens: int = -1  # prefix-cache hit on first admission; -1 = not admitted yet
    num_preemptions: int = 0
    paused: bool = False  # its consumer stopped reading: not scheduled, blocks kept (backpressure)
    timeline: Timeline | None = None  # marked at first admission, for tracing
    #: Cache keys: the chain starts at the model's namespace; blocks take the tenant's salt, the
    #: first `public_blocks` the public one (an opted-in shared system prompt).
    hash_root: bytes = b""
    cache_salt: bytes = b""
    public_blocks: int = 0
    #: Blocks fetched from the shared tier before admission: (first block index, [(k, v)]).
    remote: tuple[int, list] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def sort_key(self) -> tuple[int, int]:
        """Most important first, then oldest: the order of admission and the reverse of preemption."""
        return (self.priority, self.arrival)

    def full_block_hashes(self, block_size: int) -> list[bytes]:
        """Hash chain over every full block of token_ids, extended incrementally."""
        n_full = len(self.token_ids) // block_size
        for i in range(len(self.block_hashes), n_full):
            parent = self.block_hashes[i - 1] if i else self.hash_root
            salt = PUBLIC_SALT if i < self.public_blocks else self.cache_salt
            self.block_hashes.append(hash_block(parent, self.token_ids[i * block_size:(i + 1) * block_size], salt))
        return self.block_hashes
