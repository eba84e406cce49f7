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
