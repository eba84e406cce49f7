"""Background work (SHEDDABLE, what job workers send) yields the torch engine's steps to a more
important prompt: an interactive first token never waits behind batch decodes."""

from __future__ import annotations

from services.modelserver.engine.base import Priority
from services.modelserver.torch_engine.block_manager import BlockManager
from services.modelserver.torch_engine.scheduler import Scheduler
from services.modelserver.torch_engine.sequence import SeqStatus, Sequence


def seq(i: int, n_prompt: int, priority: Priority) -> Sequence:
    return Sequence(seq_id=i, token_ids=[1000 * i + t for t in range(n_prompt)], num_prompt_tokens=n_prompt,
                    max_tokens=100, priority=int(priority), arrival=i)


def step(s: Scheduler) -> list[int]:
    out = s.schedule()
    s.update_after_step(out)
    for sq, _ in out.scheduled:
        if sq.status is SeqStatus.RUNNING and sq.num_computed == sq.num_tokens:
            sq.token_ids.append(7)
    return [sq.seq_id for sq, _ in out.scheduled]


def test_background_sits_out_while_an_interactive_prompt_is_computed_then_resumes():
    s = Scheduler(BlockManager(64, 4), max_running=8, token_budget=6)
    batch = [seq(1, 4, Priority.SHEDDABLE), seq(2, 4, Priority.SHEDDABLE)]
    for b in batch:
        s.add(b)
    assert sorted(step(s)) == [1, 2]  # the budget: 4 + 2 of the second prompt
    assert sorted(step(s)) == [1, 2]
    s.add(seq(3, 10, Priority.STANDARD))  # an interactive prompt of two chunks arrives
    assert step(s) == [3]
    assert step(s) == [3]
    assert sorted(step(s)) == [1, 2, 3]  # its prompt is done: everyone decodes together
    assert all(b.block_ids for b in batch)  # paused, never preempted: their KV stayed


def test_standard_work_does_not_pause_for_other_standard_work():
    s = Scheduler(BlockManager(64, 4), max_running=8, token_budget=64)
    s.add(seq(1, 4, Priority.STANDARD))
    step(s)
    s.add(seq(2, 4, Priority.STANDARD))
    assert sorted(step(s)) == [1, 2]


def test_background_prompts_are_computed_in_small_chunks_so_no_step_is_a_long_batch_prefill():
    s = Scheduler(BlockManager(256, 4), max_running=8, token_budget=512, background_prefill=8)
    batch = [seq(1, 20, Priority.SHEDDABLE), seq(2, 20, Priority.SHEDDABLE)]
    for b in batch:
        s.add(b)
    out = s.schedule()
    assert [(q.seq_id, n) for q, n in out.scheduled] == [(1, 8)]  # 8 prompt tokens in all, not 40
    s.update_after_step(out)
    steps = 1
    while any(b.num_computed < b.num_tokens for b in batch):
        out = s.schedule()
        assert sum(n for _, n in out.scheduled) <= 8
        s.update_after_step(out)
        steps += 1
    assert steps == 5  # 40 prompt tokens, 8 a step; both prompts are complete, nothing was lost


def test_interactive_prompts_and_background_decodes_are_not_chunked_by_the_background_cap():
    s = Scheduler(BlockManager(256, 4), max_running=8, token_budget=512, background_prefill=8)
    decoding = [seq(1, 4, Priority.SHEDDABLE), seq(2, 4, Priority.SHEDDABLE)]
    for b in decoding:
        s.add(b)
    step(s)
    step(s)  # both prompts done (8 tokens, the cap): both decode now
    s.add(seq(3, 30, Priority.SHEDDABLE))
    got = dict((q.seq_id, n) for q, n in s.schedule().scheduled)
    assert got == {1: 1, 2: 1, 3: 8}  # decodes pass, the new background prompt takes a chunk
    s2 = Scheduler(BlockManager(256, 4), max_running=8, token_budget=512, background_prefill=8)
    s2.add(seq(4, 30, Priority.STANDARD))
    assert [(q.seq_id, n) for q, n in s2.schedule().scheduled] == [(4, 30)]  # interactive: whole prompt
