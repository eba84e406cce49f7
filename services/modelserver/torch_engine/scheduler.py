"""Continuous-batching scheduler: decides, every step, which tokens of which sequences to compute.

Each step spends a token budget: first one slice for every running sequence (its decode token, or
the next chunk of a prompt still being prefilled), then admits waiting sequences by priority and
arrival, giving each a prefill chunk that fits what is left (chunked prefill keeps step latency
bounded). When the KV pool runs dry, the least important, newest running sequence is preempted by
recompute: its blocks are released (full ones stay in the prefix cache) and it waits again.
A paused sequence (its consumer stopped reading) is skipped, keeping its blocks, and never holds
up the others.
Background work (SHEDDABLE: job and batch workers) yields whole steps while a more important
request has prompt tokens to compute, so an interactive first token never waits behind batch
decodes; the paused sequences keep their blocks and continue in the next step without it.
Background prompts are also computed in small chunks (`background_prefill` tokens per step in
all): an interactive request that arrives mid-step waits for that step only, so a step must
never be a long batch prefill.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from dataclasses import dataclass, field

from .block_manager import BlockManager
from .sequence import SeqStatus, Sequence

#: Priority value of background work (Priority.SHEDDABLE).
BACKGROUND = 3
#: Background prompt tokens computed per step, all background sequences together.
BACKGROUND_PREFILL_TOKENS = 32


@dataclass
class SchedulerOutput:
    scheduled: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, new tokens)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.scheduled)


class Scheduler:
    def __init__(self, blocks: BlockManager, max_running: int, token_budget: int,
                 background_prefill: int = BACKGROUND_PREFILL_TOKENS) -> None:
        self.blocks = blocks
        self.background_prefill = max(1, background_prefill)
        self.block_size = blocks.block_size
        self.max_running = max_running
        self.token_budget = token_budget
        self.waiting: list[Sequence] = []  # sorted by sort_key
        self.running: list[Sequence] = []  # sorted by sort_key; the last one is the preemption victim
        self.num_preemptions = 0
        #: Copies blocks fetched from the shared tier into a newly admitted sequence's blocks
        #: (seq, first block index, [(k, v)]) and publishes them; set by the engine core.
        self.install_remote: Callable[[Sequence, int, list], None] | None = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.sort_key)

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (done, cancelled or failed) and free its blocks at once."""
        if seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SeqStatus.FINISHED

    def schedule(self) -> SchedulerOutput:
        budget = self.token_budget
        scheduled: dict[Sequence, int] = {}
        preempted: list[Sequence] = []

        def preempt_last() -> Sequence:
            nonlocal budget
            victim = self.running.pop()
            self._release(victim)
            victim.num_computed = 0
            victim.num_preemptions += 1
            self.num_preemptions += 1
            self.add(victim)
            budget += scheduled.pop(victim, 0)
            preempted.append(victim)
            return victim

        i = 0
        pause_background = self._urgent_prefill()
        background_left = self.background_prefill
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, budget)
            prompt = self._background_prompt(seq, n)
            if prompt:
                n = min(n, background_left)  # a small chunk per step
            if seq.paused or n <= 0 or (pause_background and seq.priority >= BACKGROUND):
                i += 1
                continue
            if self._grow(seq, n):
                scheduled[seq] = n
                budget -= n
                background_left -= n if prompt else 0
                i += 1
                continue
            if preempt_last() is seq:
                break
            # a victim behind us freed blocks: retry the same sequence

        # Blocks were short for running work: admitting more now would only thrash.
        blocks_short = bool(preempted)
        waiting = [s for s in self.waiting if not s.paused]
        while not blocks_short and waiting and budget > 0:
            seq = waiting[0]
            if len(self.running) >= self.max_running:
                if self._outranks_last_running(seq):
                    preempt_last()
                    continue
                break
            hashes = seq.full_block_hashes(self.block_size)
            # keep at least one token to compute: its logits produce the next token
            limit = (seq.num_tokens - 1) // self.block_size
            hits = self.blocks.match_prefix(hashes[:limit])
            remote = _remote_after(seq, len(hits), limit)
            num_cached = (len(hits) + len(remote)) * self.block_size
            n = min(seq.num_tokens - num_cached, budget)
            prompt = self._background_prompt(seq, n)
            if prompt:
                if background_left <= 0:
                    break  # the rest of the queue is background too (it is sorted by priority)
                n = min(n, background_left)
            need = self.blocks.blocks_needed(num_cached + n, len(hits))
            if not self.blocks.can_allocate(need, hits):
                if self._outranks_last_running(seq):
                    preempt_last()
                    continue
                break
            self._admit(seq, hits, remote, need)
            waiting.pop(0)
            scheduled[seq] = n
            budget -= n
            background_left -= n if prompt else 0
        return SchedulerOutput(scheduled=list(scheduled.items()), preempted=preempted)

    def _admit(self, seq: Sequence, hits: list[int], remote: list, need: int) -> None:
        """Give a waiting sequence its blocks (local hits, then fresh ones with the fetched shared
        blocks installed) and move it to running."""
        seq.block_ids = self.blocks.take_hits(hits) + self.blocks.allocate(need)
        if remote and self.install_remote is not None:
            self.install_remote(seq, len(hits), remote)
        seq.remote = None
        seq.num_computed = (len(hits) + len(remote)) * self.block_size
        seq.num_committed_blocks = len(hits) + len(remote)
        if seq.num_cached_tokens < 0:  # first admission: the hit the client benefits from
            seq.num_cached_tokens = seq.num_computed
            self.blocks.record_lookup(seq.num_tokens, len(hits) * self.block_size)
            if seq.timeline is not None:
                seq.timeline.scheduled()
        self.waiting.remove(seq)
        seq.status = SeqStatus.RUNNING
        bisect.insort(self.running, seq, key=lambda s: s.sort_key)

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed counts and publish newly completed blocks to the prefix cache.

        Call before appending sampled tokens; the hash of a block covers tokens already present.
        """
        bs = self.block_size
        for seq, n in out.scheduled:
            if seq.status is not SeqStatus.RUNNING:
                continue
            seq.num_computed += n
            full = seq.num_computed // bs
            if full > seq.num_committed_blocks:
                hashes = seq.full_block_hashes(bs)
                self.blocks.commit(seq.block_ids, hashes, seq.num_committed_blocks, full)
                seq.num_committed_blocks = full

    # ---- helpers -------------------------------------------------------------------------------
    def _urgent_prefill(self) -> bool:
        """A request above the background band waits, or is still computing its prompt."""
        if self.waiting and self.waiting[0].priority < BACKGROUND:
            return True
        return any(s.priority < BACKGROUND and s.num_tokens - s.num_computed > 1 for s in self.running)

    @staticmethod
    def _background_prompt(seq: Sequence, n: int) -> bool:
        """A chunk of a background sequence's prompt (more than the one decode token)."""
        return seq.priority >= BACKGROUND and n > 1

    def _outranks_last_running(self, seq: Sequence) -> bool:
        return bool(self.running) and self.running[-1].priority > seq.priority

    def _grow(self, seq: Sequence, n: int) -> bool:
        need = self.blocks.blocks_needed(seq.num_computed + n, len(seq.block_ids))
        if need == 0:
            return True
        if not self.blocks.can_allocate(need):
            return False
        seq.block_ids.extend(self.blocks.allocate(need))
        return True

    def _release(self, seq: Sequence) -> None:
        if seq.block_ids:
            self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_committed_blocks = 0


def _remote_after(seq: Sequence, num_hits: int, limit: int) -> list:
    """Fetched blocks that continue the local hit without a gap (local hits win where both have one)."""
    if seq.remote is None:
        return []
    start, data = seq.remote
    if start > num_hits:
        return []  # local blocks before them were evicted since the fetch: recompute
    return data[num_hits - start: max(0, limit - start)]
