"""Deciding what follows an attempt: a pure function of its outcome and the request's progress.

vLLM separates deciding (`schedule()`) from applying (`update_from_output()`); so does the
router: attempt.py does the call, this module says what comes next, dispatch.py applies it.

- The upstream stream completed: DONE.
- Nothing reached the client yet: RETRY on another replica when the failure belongs to that
  replica (it is unavailable, busy, broke, went silent or left, or no longer has the model);
  FAIL with the server's status when it belongs to the request (INVALID_ARGUMENT, ...).
- Chunks reached the client: MIGRATE (continue on another replica after the relayed tokens),
  CLOSE when every token arrived and only the last chunk was lost, FAIL when the request's own
  fault ends it or the migrations are used up.
Retries and migrations spend the retry budget; failures of one dying server (its connection
lost, or the pool abandoned it) share one budget key, so one death is one failure, not a storm.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import grpc

from services.common.errors import ServiceError, Unavailable

from .attempt import Outcome

#: The request's own fault: every replica would answer the same.
REQUEST_FAULTS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION,
                            grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED,
                            grpc.StatusCode.UNIMPLEMENTED})
#: Codes that count towards ejecting the replica (it, not the request, is broken).
SERVER_FAULTS = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN,
                           grpc.StatusCode.DATA_LOSS})


class Action(enum.Enum):
    DONE = "done"
    RETRY = "retry"
    MIGRATE = "migrate"
    CLOSE = "close"
    FAIL = "fail"


@dataclass(frozen=True)
class Progress:
    """Where the request stands before this decision."""

    relayed: int  # tokens the client has (resumed ones included)
    streamed: bool  # any chunk reached the client from some attempt
    max_tokens: int
    failures: int  # failed attempts before the first chunk, this one excluded
    migrations: int  # migrations so far
    max_attempts: int
    max_migrations: int


@dataclass(frozen=True)
class Decision:
    action: Action
    error: ServiceError | None = None  # with FAIL
    server_fault: bool = False  # count towards ejecting the replica
    budget_key: str | None = None  # failures sharing a key spend the retry budget once


def decide(outcome: Outcome, progress: Progress, server_id: str, what: str) -> Decision:
    """`what` describes the failure for messages ("server-1: UNAVAILABLE: ...")."""
    if outcome.done:
        return Decision(Action.DONE)
    code = outcome.code
    abandoned = bool(outcome.abandoned)
    if not abandoned and code in REQUEST_FAULTS:
        assert code is not None
        return Decision(Action.FAIL, ServiceError.of(code, outcome.details))
    server_fault = abandoned or code in SERVER_FAULTS
    key = server_id if abandoned or outcome.connection_lost else None
    if progress.streamed or outcome.chunks:
        if progress.relayed >= progress.max_tokens:
            return Decision(Action.CLOSE, server_fault=server_fault)
        if progress.migrations >= progress.max_migrations:
            return Decision(Action.FAIL, Unavailable(f"the stream broke {progress.migrations + 1} times; "
                                                     f"last: {what}"), server_fault=server_fault)
        return Decision(Action.MIGRATE, server_fault=server_fault, budget_key=key)
    if progress.failures + 1 >= progress.max_attempts:
        return Decision(Action.FAIL, Unavailable(f"every attempt failed ({progress.failures + 1}); last: {what}"),
                        server_fault=server_fault)
    return Decision(Action.RETRY, server_fault=server_fault, budget_key=key)
