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


#: Outcomes of trying to admit a waiting sequence.
_ADMITTED, _NO_ROOM, _STOP = "admitted", "no room", "stop"


@dataclass
class _Step:
    """What one schedule() call has decided so far."""

    budget: int
    background_left: int  # background prompt tokens this step may still compute
    scheduled: dict[Sequence, int] = field(default_factory=dict)
    preempted: list[Sequence] = field(default_factory=list)

    def take(self, seq: Sequence, n: int, background_prompt: bool) -> None:
        self.scheduled[seq] = n
        self.budget -= n
        if background_prompt:
            self.background_left -= n


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
        step = _Step(self.token_budget, self.background_prefill)
        self._schedule_running(step)
        if not step.preempted:  # blocks were short for running work: admitting more would thrash
            self._schedule_waiting(step)
        return SchedulerOutput(scheduled=list(step.scheduled.items()), preempted=step.preempted)

    def _schedule_running(self, step: _Step) -> None:
        """One slice for every running sequence, in priority order, preempting from the back
        when the KV pool is short."""
        pause_background = self._urgent_prefill()
        i = 0
        while i < len(self.running) and step.budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed, step.budget)
            prompt = self._background_prompt(seq, n)
            if prompt:
                n = min(n, step.background_left)  # a small chunk per step
            if seq.paused or n <= 0 or (pause_background and seq.priority >= BACKGROUND):
                i += 1
                continue
            if self._grow(seq, n):
                step.take(seq, n, prompt)
                i += 1
            elif self._preempt_last(step) is seq:
                break
            # else a victim behind us freed blocks: retry the same sequence

    def _schedule_waiting(self, step: _Step) -> None:
        """Admit waiting sequences while slots, blocks and budget last; a more important one may
        preempt the least important running sequence."""
        waiting = [s for s in self.waiting if not s.paused]
        while waiting and step.budget > 0:
            seq = waiting[0]
            result = _NO_ROOM if len(self.running) >= self.max_running else self._try_admit(seq, step)
            if result == _ADMITTED:
                waiting.pop(0)
            elif result == _NO_ROOM and self._outranks_last_running(seq):
                self._preempt_last(step)
            else:
                break

    def _try_admit(self, seq: Sequence, step: _Step) -> str:
        """Admit `seq` with a first chunk that fits the step, after what the local prefix cache
        and the shared tier hold; or say why not."""
        # keep at least one token to compute: its logits produce the next token
        limit = (seq.num_tokens - 1) // self.block_size
        hits = self.blocks.match_prefix(seq.full_block_hashes(self.block_size)[:limit])
        remote = _remote_after(seq, len(hits), limit)
        num_cached = (len(hits) + len(remote)) * self.block_size
        n = min(seq.num_tokens - num_cached, step.budget)
        prompt = self._background_prompt(seq, n)
        if prompt:
            if step.background_left <= 0:
                return _STOP  # the rest of the queue is background too (it is sorted by priority)
            n = min(n, step.background_left)
        need = self.blocks.blocks_needed(num_cached + n, len(hits))
        if not self.blocks.can_allocate(need, hits):
            return _NO_ROOM
        self._admit(seq, hits, remote, need)
        step.take(seq, n, prompt)
        return _ADMITTED

    def _preempt_last(self, step: _Step) -> Sequence:
        """Preempt the least important, newest running sequence by recompute."""
        victim = self.running.pop()
        self._release(victim)
        victim.num_computed = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        self.add(victim)
        step.budget += step.scheduled.pop(victim, 0)
        step.preempted.append(victim)
        return victim

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
