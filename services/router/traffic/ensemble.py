"""Ensembles: one request fanned out to every member in parallel, then combined.

Each member is the client's request with the member's overrides (temperature, seed, a prompt
template around the prompt or the last user message), served through its target like any other
request (so a member may be a split or a fallback chain), under the same deadline.

What streaming means per combiner:
- first_success (hedging): the first member to produce a chunk wins and is streamed as it comes;
  the others are cancelled at that moment. Members that fail before any chunk are ignored unless
  all fail. Usage is the winner's plus the tokens the others had produced when cancelled.
- majority, weighted_vote, best_mean_logprob: a vote needs whole answers, so the stream carries
  one chunk, the winner's whole answer, once every member has finished (or failed). Fewer than
  `quorum` answers is UNAVAILABLE naming each failure (or the request's own error, such as
  INVALID_ARGUMENT, when that was why). Usage adds up every member that answered. Resuming a
  voted answer (resume_token_ids) is refused: there is no one stream to continue.
`served_by` is the winning member's (its route says which member: "qa[ensemble:2]>m@b").
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from meshserve.v1 import inference_pb2

from services.common.errors import InvalidArgument, ServiceError, Unavailable
from services.common.traffic.records import PROMPT_PLACEHOLDER, Ensemble, Member, Policy
from services.common.validation import ChatMessage, ValidRequest

from ..decide import REQUEST_FAULTS
from .call import Call, Chunks
from .combine import MemberAnswer, combine

ServeTarget = Callable[..., Chunks]
QUEUE_CHUNKS = 16


def member_request(req: ValidRequest, member: Member, index: int, logprobs: bool) -> ValidRequest:
    sampling = req.sampling
    if member.temperature is not None:
        sampling = replace(sampling, temperature=member.temperature)
    if member.seed is not None:
        sampling = replace(sampling, seed=member.seed)
    if logprobs and not sampling.logprobs:
        sampling = replace(sampling, logprobs=True)
    prompt, messages = req.prompt, req.messages
    if member.template:
        if prompt is not None:
            prompt = member.template.replace(PROMPT_PLACEHOLDER, prompt)
        elif messages:
            last = max((i for i, m in enumerate(messages) if m.role == "user"), default=len(messages) - 1)
            text = member.template.replace(PROMPT_PLACEHOLDER, messages[last].content)
            messages = (*messages[:last], ChatMessage(messages[last].role, text), *messages[last + 1:])
    request_id = f"{req.request_id[:120]}.m{index}" if req.request_id else ""
    return replace(req, model=member.target, sampling=sampling, prompt=prompt, messages=messages,
                   request_id=request_id)


@dataclass
class _Answer:
    """One member's whole answer."""

    index: int
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    last: inference_pb2.GenerateResponse | None = None


async def _collect(chunks: Chunks, index: int) -> _Answer:
    answer = _Answer(index)
    async with aclosing(chunks):
        async for chunk in chunks:
            answer.text.append(chunk.text)
            answer.token_ids.extend(chunk.token_ids)
            answer.logprobs.extend(chunk.logprobs)
            answer.last = chunk
    return answer


def _quorum_error(policy: Policy, spec: Ensemble, answered: int,
                  errors: list[tuple[str, ServiceError]]) -> ServiceError:
    own = next((e for _, e in errors if e.code in REQUEST_FAULTS), None)
    if own is not None:
        return own
    detail = "; ".join(f"{t}: {e.code.name}: {e.message[:160]}" for t, e in errors)
    return Unavailable(f"ensemble {policy.name!r}: {answered} of {len(spec.members)} members answered, "
                       f"quorum is {spec.quorum} ({detail})")


async def run_ensemble(serve: ServeTarget, policy: Policy, spec: Ensemble, req: ValidRequest, call: Call,
                       route: str, depth: int) -> Chunks:
    if spec.combiner == "first_success":
        async with aclosing(_hedge(serve, policy, spec, req, call, route, depth)) as chunks:
            async for chunk in chunks:
                yield chunk
        return
    if req.resume_token_ids:
        raise InvalidArgument(f"ensemble {policy.name!r} votes ({spec.combiner}): its answer cannot be "
                              "resumed; send the request again without resume_token_ids")
    yield await _vote(serve, policy, spec, req, call, route, depth)


def _member_chunks(serve: ServeTarget, policy: Policy, spec: Ensemble, i: int, req: ValidRequest, call: Call,
                   route: str, depth: int) -> Chunks:
    member = spec.members[i]
    mreq = member_request(req, member, i, spec.combiner == "best_mean_logprob")
    return serve(member.target, mreq, call, f"{route}{policy.name}[ensemble:{i}]>", depth + 1, None)


async def _vote(serve: ServeTarget, policy: Policy, spec: Ensemble, req: ValidRequest, call: Call, route: str,
                depth: int) -> inference_pb2.GenerateResponse:
    tasks = [asyncio.ensure_future(_collect(_member_chunks(serve, policy, spec, i, req, call, route, depth), i))
             for i in range(len(spec.members))]
    try:
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
    answers: list[_Answer] = []
    errors: list[tuple[str, ServiceError]] = []
    for member, result in zip(spec.members, results, strict=True):
        if isinstance(result, ServiceError):
            errors.append((member.target, result))
        elif isinstance(result, BaseException):
            raise result
        elif result.last is not None:
            answers.append(result)
    if len(answers) < spec.quorum:
        raise _quorum_error(policy, spec, len(answers), errors)
    winner = combine([MemberAnswer(a.index, "".join(a.text), spec.members[a.index].weight, tuple(a.logprobs))
                      for a in answers], spec.combiner, spec.answer_format)
    best = next(a for a in answers if a.index == winner.index)
    assert best.last is not None
    out = inference_pb2.GenerateResponse(text=winner.text, token_ids=best.token_ids,
                                         finish_reason=best.last.finish_reason,
                                         request_id=req.request_id or best.last.request_id)
    if req.sampling.logprobs:
        out.logprobs.extend(best.logprobs)
    out.served_by.CopyFrom(best.last.served_by)
    for a in answers:
        assert a.last is not None
        out.usage.prompt_tokens += a.last.usage.prompt_tokens
        out.usage.completion_tokens += a.last.usage.completion_tokens
        out.usage.cached_tokens += a.last.usage.cached_tokens
    return out


async def _pump(chunks: Chunks, i: int, queue: asyncio.Queue) -> None:
    try:
        async with aclosing(chunks):
            async for chunk in chunks:
                await queue.put((i, chunk, None))
        await queue.put((i, None, None))
    except Exception as exc:  # noqa: BLE001 - handed to the reader, which decides
        await queue.put((i, None, exc))


async def _hedge(serve: ServeTarget, policy: Policy, spec: Ensemble, req: ValidRequest, call: Call, route: str,
                 depth: int) -> Chunks:
    queue: asyncio.Queue = asyncio.Queue(QUEUE_CHUNKS)
    tasks = [asyncio.ensure_future(_pump(_member_chunks(serve, policy, spec, i, req, call, route, depth), i, queue))
             for i in range(len(spec.members))]
    winner: int | None = None
    errors: list[tuple[str, ServiceError]] = []
    others = 0  # tokens the losing members produced before they were cancelled
    try:
        while True:
            i, chunk, exc = await queue.get()
            if winner is None and exc is not None:
                if not isinstance(exc, ServiceError):
                    raise exc
                errors.append((spec.members[i].target, exc))
                if len(errors) == len(tasks):
                    raise _quorum_error(policy, spec, 0, errors)
                continue
            if winner is None:
                winner = i
                for j, t in enumerate(tasks):
                    if j != i:
                        t.cancel()
            if i != winner:
                others += len(chunk.token_ids) if chunk is not None else 0
                continue
            if exc is not None:
                raise exc
            if chunk is None:
                return
            if chunk.HasField("usage") and others:
                chunk.usage.completion_tokens += others
            yield chunk
    finally:
        for t in tasks:
            t.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)

