"""The chaos benchmark's exact-answer checker finds every kind of damage to a streamed answer, and
its expected answers are what the real sim engine produces."""

from __future__ import annotations

import pytest

from bench.chaos.answers import check_tokens, expected_answer
from services.modelserver.engine.base import GenerationRequest, SamplingParams
from services.modelserver.engine.sim import SimConfig, SimEngine

N = 50


@pytest.fixture
def answer():
    return expected_answer("t0x1", N)


def _text(expected, positions: list[int]) -> str:
    words = expected.text.split()
    return " ".join(words[i] for i in positions)


def test_the_ids_of_an_expected_answer_are_distinct(answer):
    assert len(set(answer.token_ids)) == N
    assert len(answer.prompt.split()) == N


async def test_expected_answer_is_what_the_sim_engine_says(answer):
    engine = SimEngine("echo", SimConfig(tokens_per_second=100_000))
    await engine.start()
    req = GenerationRequest(request_id="r", model="echo", prompt=answer.prompt,
                            sampling=SamplingParams(max_tokens=N))
    ids: list[int] = []
    text = ""
    async for chunk in engine.generate(req):
        ids.extend(chunk.token_ids)
        text += chunk.text
    assert tuple(ids) == answer.token_ids
    assert text == answer.text


def test_a_whole_answer_is_exact(answer):
    check = check_tokens(answer, list(answer.token_ids), answer.text, finished=True)
    assert check.exact and check.received == N


def test_a_lost_token_is_found(answer):
    positions = [i for i in range(N) if i != 17]
    check = check_tokens(answer, [answer.token_ids[i] for i in positions], _text(answer, positions), True)
    assert (check.lost, check.duplicated, check.reordered) == (1, 0, 0)
    assert not check.exact


def test_a_duplicated_token_is_found(answer):
    positions = [*range(21), 20, *range(21, N)]  # a resume that repeated the last token it had
    check = check_tokens(answer, [answer.token_ids[i] for i in positions], _text(answer, positions), True)
    assert (check.lost, check.duplicated, check.reordered) == (0, 1, 0)
    assert not check.exact


def test_a_reordered_token_is_found(answer):
    positions = list(range(N))
    positions[30], positions[31] = positions[31], positions[30]
    check = check_tokens(answer, [answer.token_ids[i] for i in positions], _text(answer, positions), True)
    assert (check.lost, check.duplicated, check.reordered) == (0, 0, 1)
    assert not check.exact


def test_a_finished_answer_missing_its_tail_lost_tokens(answer):
    check = check_tokens(answer, list(answer.token_ids[:40]), _text(answer, list(range(40))), finished=True)
    assert check.lost == 10 and not check.exact


def test_an_unfinished_answer_is_judged_up_to_where_it_got(answer):
    """A failed stream's missing tail is the failure, not lost tokens; a gap before it is."""
    head = list(range(40))
    assert check_tokens(answer, [answer.token_ids[i] for i in head], _text(answer, head), False).exact
    gap = [i for i in head if i != 5]
    assert check_tokens(answer, [answer.token_ids[i] for i in gap], _text(answer, gap), False).lost == 1


def test_a_wrong_text_or_foreign_token_is_not_exact(answer):
    ids = list(answer.token_ids)
    assert not check_tokens(answer, ids, answer.text + " extra", True).exact
    ids[3] = next(t for t in range(1, 32000) if t not in answer.token_ids)
    assert check_tokens(answer, ids, answer.text, True).foreign == 1
