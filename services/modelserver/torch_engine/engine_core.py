"""The synchronous engine loop: schedule -> build batch -> run model -> sample -> update.

No threads and no asyncio here, so every behaviour is testable by calling step() directly.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field

from services.cache.keys import PUBLIC_SALT
from services.cache.kv_tier import BlockRef, KvTier

from ..engine.base import FinishReason, GenerationChunk, SamplingParams, Timeline, Usage
from .block_manager import BlockManager
from .detokenizer import IncrementalDetokenizer
from .forward_batch import SeqSlice, build_forward_batch
from .model import KVCache, LlamaModel
from .sampler import SamplingRow, make_generator, sample
from .scheduler import Scheduler
from .sequence import Sequence

log = logging.getLogger(__name__)


@dataclass
class CoreRequest:
    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams
    priority: int = 2
    resume_ids: list[int] = field(default_factory=list)
    deadline: float | None = None  # time.monotonic() value
    timeline: Timeline | None = None  # the scheduler marks first admission (tracing)
    cache: CacheKeying | None = None  # key chain root, tenant salt, public blocks
    remote: tuple[int, list] | None = None  # blocks fetched from the shared tier (first index, [(k, v)])


@dataclass(frozen=True)
class CacheKeying:
    """How a request's blocks are keyed: the model's namespace, the tenant's salt, and how many
    leading blocks are public (services/cache/keys.py)."""

    root: bytes
    salt: bytes
    public_blocks: int = 0


@dataclass
class _Active:
    req: CoreRequest
    seq: Sequence
    row: SamplingRow
    detok: IncrementalDetokenizer
    stop_ids: frozenset[int]


class EngineCore:
    def __init__(self, model: LlamaModel, kv: KVCache, decode: Callable[[Seq[int]], str],
                 eos_token_ids: frozenset[int], max_running: int, token_budget: int, max_context: int,
                 clock: Callable[[], float] = time.monotonic, tier: KvTier | None = None) -> None:
        self.model = model
        self.kv = kv
        self.decode = decode
        self.eos_token_ids = eos_token_ids
        self.max_context = max_context
        self.blocks = BlockManager(kv.num_blocks, kv.block_size)
        self.scheduler = Scheduler(self.blocks, max_running, token_budget)
        self.scheduler.install_remote = self._install_remote
        self.tier = tier
        self.clock = clock
        self._active: dict[str, _Active] = {}
        self._pinned: dict[int, int] = {}  # pool block -> references the tier's writer holds
        self._arrivals = 0
        # observability
        self.num_steps = 0
        self.max_batch_seqs = 0  # most sequences computed together in one step
        self.generated_tokens = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    # ---- requests ------------------------------------------------------------------------------
    def add_request(self, req: CoreRequest) -> None:
        if req.request_id in self._active:
            raise ValueError(f"request id {req.request_id!r} is already active")
        p = req.sampling
        self._arrivals += 1
        seq = Sequence(
            seq_id=self._arrivals, token_ids=list(req.prompt_ids) + list(req.resume_ids),
            num_prompt_tokens=len(req.prompt_ids), max_tokens=p.max_tokens, priority=int(req.priority),
            arrival=self._arrivals, deadline=req.deadline, timeline=req.timeline, remote=req.remote)
        if req.cache is not None:
            seq.hash_root, seq.cache_salt, seq.public_blocks = req.cache.root, req.cache.salt, req.cache.public_blocks
        row = SamplingRow(p.temperature, p.top_k, p.top_p, make_generator(p.seed), p.logprobs)
        detok = IncrementalDetokenizer(self.decode, seq.token_ids, p.stop)
        self._active[req.request_id] = _Active(req, seq, row, detok, self.eos_token_ids | frozenset(p.stop_token_ids))
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> GenerationChunk | None:
        """Cancel a request now; its blocks are free when this returns. None if it already ended."""
        a = self._active.get(request_id)
        if a is None:
            return None
        return self._finish(request_id, a, FinishReason.CANCELLED, a.detok.flush())

    def abort_all(self) -> list[str]:
        """Cancel every request (after an internal failure); returns their ids."""
        ids = list(self._active)
        for rid in ids:
            self.abort(rid)
        return ids

    def has_work(self) -> bool:
        return bool(self._active)

    def has_runnable(self) -> bool:
        """Work a step could do now: a request that is not paused, or one whose deadline passed."""
        now = self.clock()
        return any(not a.seq.paused or (a.req.deadline is not None and now >= a.req.deadline)
                   for a in self._active.values())

    def set_paused(self, request_id: str, paused: bool) -> None:
        """Backpressure: a paused request is not scheduled and keeps its KV blocks."""
        a = self._active.get(request_id)
        if a is not None:
            a.seq.paused = paused

    # ---- the loop ------------------------------------------------------------------------------
    def step(self) -> list[tuple[str, GenerationChunk]]:
        """Run one engine iteration; return the chunks it produced, keyed by request id."""
        if self.tier is not None:
            self._unpin(self.tier.drain_released())
        outputs = self._expire_deadlines()
        if not self.scheduler.has_work():
            return outputs
        sched = self.scheduler.schedule()
        if not sched.scheduled:
            return outputs
        slices = [SeqSlice(seq.token_ids[seq.num_computed:seq.num_computed + n], seq.num_computed,
                           seq.block_ids, seq.num_computed + n == seq.num_tokens)
                  for seq, n in sched.scheduled]
        by_seq = {a.seq: rid for rid, a in self._active.items()}
        try:
            batch = build_forward_batch(slices, self.kv.block_size)
            logits = self.model.forward(batch, self.kv)
        except Exception:  # a failed forward must not leak blocks or leave clients waiting
            log.exception("model forward failed; failing %d requests", len(sched.scheduled))
            for seq, _ in sched.scheduled:
                rid = by_seq[seq]
                outputs.append((rid, self._finish(rid, self._active[rid], FinishReason.ERROR, "")))
            return outputs
        committed = {seq: seq.num_committed_blocks for seq, _ in sched.scheduled} if self.tier is not None else {}
        self.scheduler.update_after_step(sched)
        if committed:
            self._offer_to_tier(committed)
        self.num_steps += 1
        self.max_batch_seqs = max(self.max_batch_seqs, len(sched.scheduled))
        if batch.logits_owner:
            seqs = [sched.scheduled[i][0] for i in batch.logits_owner]
            actives = [self._active[by_seq[s]] for s in seqs]
            result = sample(logits, [a.row for a in actives], self.model.ops)
            for a, tok, lp in zip(actives, result.token_ids, result.logprobs, strict=True):
                outputs.append(self._on_token(by_seq[a.seq], a, tok, lp))
            self._count_tokens(len(actives))
        return outputs

    def _on_token(self, rid: str, a: _Active, tok: int, lp: float | None) -> tuple[str, GenerationChunk]:
        seq = a.seq
        seq.token_ids.append(tok)
        logprobs = [lp] if lp is not None else []
        if tok in a.stop_ids:
            return rid, self._finish(rid, a, FinishReason.STOP, a.detok.flush(), [tok], logprobs)
        text = a.detok.add(tok)
        if a.detok.stopped:
            return rid, self._finish(rid, a, FinishReason.STOP, text, [tok], logprobs)
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_context:
            return rid, self._finish(rid, a, FinishReason.LENGTH, text + a.detok.flush(), [tok], logprobs)
        return rid, GenerationChunk(text=text, token_ids=[tok], logprobs=logprobs)

    def _finish(self, rid: str, a: _Active, reason: FinishReason, text: str, token_ids: list[int] | None = None,
                logprobs: list[float] | None = None) -> GenerationChunk:
        self.scheduler.finish(a.seq)
        del self._active[rid]
        seq = a.seq
        usage = Usage(prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
                      cached_tokens=max(0, seq.num_cached_tokens))
        return GenerationChunk(text=text, token_ids=token_ids or [], logprobs=logprobs or [],
                               finish_reason=reason, usage=usage)

    def _expire_deadlines(self) -> list[tuple[str, GenerationChunk]]:
        now = self.clock()
        expired = [(rid, a) for rid, a in self._active.items()
                   if a.req.deadline is not None and now >= a.req.deadline]
        return [(rid, self._finish(rid, a, FinishReason.CANCELLED, a.detok.flush())) for rid, a in expired]

    # ---- the shared tier ------------------------------------------------------------------------
    def _install_remote(self, seq: Sequence, start: int, data: list) -> None:
        """Copy fetched blocks into the sequence's fresh blocks [start, start + len) and publish them."""
        pools = self.kv.pools
        for j, parts in enumerate(data):
            b = seq.block_ids[start + j]
            for pool, part in zip(pools, parts, strict=True):
                pool[:, b].copy_(part)
        self.blocks.publish(seq.block_ids, seq.full_block_hashes(self.kv.block_size), start, start + len(data))

    def _offer_to_tier(self, committed_before: dict[Sequence, int]) -> None:
        """Blocks published this step go to the shared tier; the accepted ones stay pinned until copied."""
        assert self.tier is not None
        bs = self.kv.block_size
        refs: list[BlockRef] = []
        for seq, before in committed_before.items():
            hashes = seq.block_hashes
            for i in range(before, seq.num_committed_blocks):
                b = seq.block_ids[i]
                if self.blocks.block_hash[b] != hashes[i]:
                    continue  # another sequence's copy is the cached one; it was offered then
                salt = PUBLIC_SALT if i < seq.public_blocks else seq.cache_salt
                refs.append(BlockRef(hashes[i], hashes[i - 1] if i else seq.hash_root, salt,
                                     tuple(seq.token_ids[i * bs:(i + 1) * bs]), b))
        accepted = self.tier.offer(refs) if refs else []
        if accepted:
            self.blocks.take_hits(r.block for r in accepted)
            for r in accepted:
                self._pinned[r.block] = self._pinned.get(r.block, 0) + 1

    def has_unpins(self) -> bool:
        """Blocks the tier's writer has copied and the pool may reuse (step() unpins them)."""
        return self.tier is not None and bool(self.tier.released)

    def _unpin(self, block_ids: list[int]) -> None:
        for b in block_ids:
            self.blocks.free([b])
            left = self._pinned.pop(b, 1) - 1
            if left > 0:
                self._pinned[b] = left

    def kv_blocks_in_use(self) -> int:
        """Blocks sequences hold: the pool's used blocks less those only the tier's writer pins
        (a copy in flight is not KV pressure; routers read this). Safe from any thread."""
        pinned_only = sum(1 for b, n in list(self._pinned.items()) if self.blocks.ref_counts[b] <= n)
        return max(0, self.blocks.num_used - pinned_only)

    # ---- stats ---------------------------------------------------------------------------------
    def _count_tokens(self, n: int) -> None:
        now = self.clock()
        self.generated_tokens += n
        self._recent.append((now, n))
        while self._recent and now - self._recent[0][0] > 10.0:
            self._recent.popleft()

    def tokens_per_second(self, window: float = 10.0) -> float:
        """Generated tokens per second over the last `window` seconds; 0 once idle that long.

        Called from other threads (load reports) while the core thread appends, hence the copy
        retried on a concurrent mutation and no pruning here.
        """
        for _ in range(3):
            try:
                recent = list(self._recent)
                break
            except RuntimeError:  # deque mutated during iteration
                continue
        else:
            return 0.0
        now = self.clock()
        recent = [(t, n) for t, n in recent if now - t <= window]
        if not recent:
            return 0.0
        # the oldest entry only opens the window: its tokens were produced before it
        span = now - recent[0][0]
        if len(recent) < 2 or span < 1e-3:
            return 0.0
        return sum(n for _, n in recent[1:]) / span
