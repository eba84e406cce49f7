"""What follows an attempt: a pure function of its outcome and the request's progress."""

import grpc
import pytest

from services.router.attempt import Outcome
from services.router.decide import Action, Progress, decide

C = grpc.StatusCode


def progress(**kw) -> Progress:
    base = dict(relayed=0, streamed=False, max_tokens=10, failures=0, migrations=0, max_attempts=3,
                max_migrations=3)
    base.update(kw)
    return Progress(**base)  # type: ignore[arg-type]


def failed(code=None, abandoned="", chunks=0, lost=False) -> Outcome:
    return Outcome(code=code, details="boom", abandoned=abandoned, chunks=chunks, tokens=chunks,
                   connection_lost=lost)


def test_a_completed_stream_is_done():
    assert decide(Outcome(done=True, chunks=3), progress(), "s", "").action is Action.DONE


@pytest.mark.parametrize("code", [C.INVALID_ARGUMENT, C.FAILED_PRECONDITION, C.OUT_OF_RANGE,
                                  C.DEADLINE_EXCEEDED])
def test_the_requests_own_faults_fail_at_once_with_the_same_code(code):
    d = decide(failed(code), progress(), "s", "s: boom")
    assert d.action is Action.FAIL and d.error is not None and d.error.code == code
    assert not d.server_fault


@pytest.mark.parametrize("code, fault", [(C.UNAVAILABLE, True), (C.INTERNAL, True), (C.UNKNOWN, True),
                                         (C.RESOURCE_EXHAUSTED, False), (C.NOT_FOUND, False),
                                         (C.CANCELLED, False), (C.ABORTED, False)])
def test_replica_failures_before_a_token_retry(code, fault):
    d = decide(failed(code), progress(), "s", "")
    assert d.action is Action.RETRY and d.server_fault is fault
    assert d.budget_key is None  # a live server answered: each retry pays


def test_abandoned_or_disconnected_attempts_share_the_dying_servers_budget_key():
    for outcome in (failed(abandoned="its server left the mesh"), failed(C.UNAVAILABLE, lost=True)):
        d = decide(outcome, progress(), "server-3", "")
        assert d.action is Action.RETRY and d.server_fault and d.budget_key == "server-3"


def test_after_tokens_the_stream_migrates_closes_or_gives_up():
    d = decide(failed(C.UNAVAILABLE, chunks=2, lost=True), progress(relayed=2, streamed=True), "s", "")
    assert d.action is Action.MIGRATE and d.budget_key == "s"
    d = decide(failed(abandoned="hung", chunks=1), progress(relayed=10, streamed=True), "s", "")
    assert d.action is Action.CLOSE  # every token arrived, only the last chunk was lost
    d = decide(failed(C.UNAVAILABLE, chunks=1), progress(relayed=4, streamed=True, migrations=3), "s", "x")
    assert d.action is Action.FAIL and d.error is not None and d.error.code == C.UNAVAILABLE
    assert "broke 4 times" in d.error.message


def test_attempts_run_out():
    d = decide(failed(C.UNAVAILABLE), progress(failures=2), "s", "s: UNAVAILABLE: boom")
    assert d.action is Action.FAIL and d.error is not None and "every attempt failed (3)" in d.error.message
