"""Scheduler: priority order, token budget with chunked prefill, and preemption victims."""

from __future__ import annotations

from services.modelserver.engine.base import Priority
from services.modelserver.torch_engine.block_manager import BlockManager
from services.modelserver.torch_engine.scheduler import Scheduler
from services.modelserver.torch_engine.sequence import SeqStatus, Sequence

BS = 4


def seq(i: int, n_prompt: int, priority: Priority = Priority.STANDARD, max_tokens: int = 100) -> Sequence:
    return Sequence(seq_id=i, token_ids=[1000 * i + t for t in range(n_prompt)], num_prompt_tokens=n_prompt,
                    max_tokens=max_tokens, priority=int(priority), arrival=i)


def run_step(s: Scheduler):
    """One step without a model: advance computed counts, append a token to finished prefills."""
    out = s.schedule()
    s.update_after_step(out)
    for sq, _ in out.scheduled:
        if sq.status is SeqStatus.RUNNING and sq.num_computed == sq.num_tokens:
            sq.token_ids.append(7)
    return out


def test_priority_then_arrival_order():
    s = Scheduler(BlockManager(64, BS), max_running=2, token_budget=100)
    a, b, c = seq(1, 4, Priority.SHEDDABLE), seq(2, 4, Priority.STANDARD), seq(3, 4, Priority.CRITICAL)
    for x in (a, b, c):
        s.add(x)
    out = s.schedule()
    assert [sq.seq_id for sq, _ in out.scheduled] == [3, 2]
    assert s.waiting == [a]


def test_token_budget_chunks_long_prefill():
    s = Scheduler(BlockManager(64, BS), max_running=8, token_budget=10)
    long, short = seq(1, 25), seq(2, 3)
    s.add(long)
    s.add(short)
    out = run_step(s)
    assert [(q.seq_id, n) for q, n in out.scheduled] == [(1, 10)]
    out = run_step(s)
    assert [(q.seq_id, n) for q, n in out.scheduled] == [(1, 10)]
    out = run_step(s)  # 5 left for the long prompt, the short one fits in the rest
    assert [(q.seq_id, n) for q, n in out.scheduled] == [(1, 5), (2, 3)]
    out = run_step(s)  # both decode now: one token each
    assert sorted((q.seq_id, n) for q, n in out.scheduled) == [(1, 1), (2, 1)]
    assert out.num_tokens <= 10


def test_preempts_lowest_priority_newest_when_blocks_run_out():
    bm = BlockManager(4, BS)
    s = Scheduler(bm, max_running=8, token_budget=100)
    crit, old, new = seq(1, 4, Priority.CRITICAL), seq(2, 3, Priority.SHEDDABLE), seq(3, 3, Priority.SHEDDABLE)
    for x in (crit, old, new):
        s.add(x)
    run_step(s)  # crit: 1 block (+1 next), old/new: 1 block each -> all 4 used soon
    assert bm.num_used == 3
    preempted = []
    for _ in range(6):
        out = run_step(s)
        preempted += out.preempted
        assert bm.num_used <= bm.num_blocks
    assert preempted and preempted[0] is new
    assert new.status is SeqStatus.WAITING and new.num_computed == 0 and new.block_ids == []
    assert crit.status is SeqStatus.RUNNING


def test_critical_waiting_request_preempts_sheddable():
    bm = BlockManager(2, BS)
    s = Scheduler(bm, max_running=8, token_budget=100)
    low = seq(1, 7, Priority.SHEDDABLE)
    s.add(low)
    run_step(s)
    assert bm.num_free == 0
    high = seq(2, 4, Priority.CRITICAL)
    s.add(high)
    out = s.schedule()
    assert out.preempted == [low]
    assert [q for q, _ in out.scheduled] == [high]


def test_equal_priority_waits_instead_of_preempting():
    bm = BlockManager(2, BS)
    s = Scheduler(bm, max_running=8, token_budget=100)
    first = seq(1, 7)
    s.add(first)
    run_step(s)
    s.add(seq(2, 4))
    out = s.schedule()
    assert out.preempted == [] and [q for q, _ in out.scheduled] == [first]


def test_prefix_hit_on_admission_and_finish_frees():
    bm = BlockManager(16, BS)
    s = Scheduler(bm, max_running=8, token_budget=100)
    a = seq(1, 9)
    s.add(a)
    run_step(s)
    b = Sequence(seq_id=2, token_ids=list(a.token_ids[:9]), num_prompt_tokens=9, max_tokens=5, arrival=2)
    s.add(b)
    out = s.schedule()
    assert dict((q.seq_id, n) for q, n in out.scheduled)[2] == 1  # 8 of 9 tokens came from the cache
    assert b.num_cached_tokens == 8 and b.block_ids[:2] == a.block_ids[:2]
    s.update_after_step(out)
    s.finish(a)
    s.finish(b)
    assert bm.num_used == 0 and not s.has_work()
