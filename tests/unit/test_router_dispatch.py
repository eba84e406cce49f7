"""Dispatcher: retries, migration, per-attempt deadlines, shedding, on fake servers (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from meshserve.v1 import common_pb2, inference_pb2, modelserver_pb2

from services.router.config import DispatchSettings
from services.router.dispatch import Dispatcher, RouteError, merge_chunks
from services.router.pool import Backend
from tests.helpers import ask, sample, until

MODEL = "echo"
MIGRATIONS = "meshserve_router_migrations_total"
QUEUED = "meshserve_router_queue_depth"
SIX = "a b c d e f"  # six words: the fake servers answer word i of the prompt


def words_of(req) -> list[str]:
    text = req.prompt or " ".join(m.content for m in req.messages)
    return text.split()


class FakeCall:
    """Scripted upstream stream: `parts` chunks, then an error, a hang, or the end."""

    def __init__(self, parts: list, error: grpc.StatusCode | None = None,
                 hang: bool = False) -> None:
        self._parts, self._error, self._hang = parts, error, hang
        self._cancelled = asyncio.Event()
        self._done = False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        try:
            for p in self._parts:
                await asyncio.sleep(0)
                yield p
            if self._hang:
                await self._cancelled.wait()
                raise asyncio.CancelledError
            if self._error is not None:
                raise grpc.aio.AioRpcError(self._error, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                           details=f"injected {self._error.name}")
        finally:
            self._done = True

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        self._cancelled.set()
        self._done = True
        return True


class FakeServer:
    """Answers like the sim engine (word i of the prompt, resumable); `script` can break it."""

    def __init__(self, backend: str = "sim") -> None:
        self.backend = backend
        self.calls: list[modelserver_pb2.ModelServerServiceGenerateRequest] = []
        self.script: Callable[[list], FakeCall] | None = None

    def Generate(self, request, timeout=None):
        self.calls.append(request)
        words = words_of(request)
        start = len(request.resume_token_ids)
        n = request.sampling.max_tokens or 128
        parts = []
        for i in range(start, n):
            part = modelserver_pb2.ModelServerServiceGenerateResponse(
                text=words[i % len(words)] if i == 0 else " " + words[i % len(words)],
                token_ids=[100 + i])
            if i + 1 == n:
                part.finish_reason = common_pb2.FINISH_REASON_LENGTH
                part.usage.prompt_tokens = len(words)
                part.usage.completion_tokens = n if self.backend == "torch" else n - start
            parts.append(part)
        return self.script(parts) if self.script else FakeCall(parts)


class FakePool:
    def __init__(self, servers: dict[str, FakeServer]) -> None:
        self.backends = {
            sid: Backend(info=modelserver_pb2.ServerInfo(server_id=sid, region="local",
                                                         backend=s.backend, simulated=True),
                         channel=None, stub=s)  # type: ignore[arg-type]  # no channel; a fake stub
            for sid, s in servers.items()}
        self.policy_record = None
        self.listeners: list = []

    def on_change(self, f) -> None:
        self.listeners.append(f)

    def on_leave(self, f) -> None:
        pass

    def known_models(self) -> set[str]:
        return {MODEL}

    def candidates(self, model: str) -> list[Backend]:
        return list(self.backends.values()) if model == MODEL else []

    def saturate(self, sid: str, running: int, max_running: int = 2) -> None:
        self.backends[sid].set_report(modelserver_pb2.LoadReport(
            server_id=sid, running=running, max_running=max_running))
        for f in self.listeners:
            f()


async def collect(d: Dispatcher, request, timeout=5.0, metadata=None) -> list:
    return [c async for c in d.stream(request, timeout, metadata)]


def dispatcher(pool: FakePool, **kw: Any) -> Dispatcher:
    kw.setdefault("policy", "round_robin")  # deterministic order: a, then b, ...
    return Dispatcher(pool, "r0", DispatchSettings(**kw))  # type: ignore[arg-type]  # duck-typed BackendPool


@pytest.mark.parametrize("backend", ["sim", "torch"])
async def test_mid_stream_failure_migrates_and_the_client_sees_one_answer(backend):
    a, b = FakeServer(backend), FakeServer(backend)
    a.script = lambda parts: FakeCall(parts[:3], error=grpc.StatusCode.UNAVAILABLE)
    pool = FakePool({"a": a, "b": b})
    before = sample(MIGRATIONS, model=MODEL)
    chunks = await collect(dispatcher(pool), ask(SIX, 6))
    whole = merge_chunks(chunks)
    assert whole.text == "a b c d e f"
    assert list(whole.token_ids) == [100, 101, 102, 103, 104, 105]
    assert whole.usage.completion_tokens == 6 and whole.usage.prompt_tokens == 6
    assert list(b.calls[0].resume_token_ids) == [100, 101, 102]
    assert [c.served_by.server_id for c in chunks] == ["a"] * 3 + ["b"] * 3
    assert sample(MIGRATIONS, model=MODEL) == before + 1
    assert pool.backends["a"].consecutive_failures == 1


async def test_failure_before_first_token_retries_elsewhere():
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall([], error=grpc.StatusCode.UNAVAILABLE)
    chunks = await collect(dispatcher(FakePool({"a": a, "b": b})), ask(SIX, 2))
    assert merge_chunks(chunks).text == "a b"
    assert not b.calls[0].resume_token_ids


async def test_silent_server_hits_the_attempt_deadline_and_the_request_moves():
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall([], hang=True)
    d = dispatcher(FakePool({"a": a, "b": b}), first_token_timeout_s=0.05)
    assert merge_chunks(await collect(d, ask(SIX, 2))).text == "a b"
    # A stall after some tokens migrates.
    a.script = lambda parts: FakeCall(parts[:2], hang=True)
    d = dispatcher(FakePool({"a": a, "b": b}), stall_timeout_s=0.05)
    assert merge_chunks(await collect(d, ask(SIX, 6))).text == "a b c d e f"


async def test_request_errors_pass_through_without_retry():
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall([], error=grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(RouteError) as info:
        await collect(dispatcher(FakePool({"a": a, "b": b})), ask(SIX, 6))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and not b.calls


async def test_retry_budget_stops_amplification():
    servers = {s: FakeServer() for s in "abc"}
    for s in servers.values():
        s.script = lambda parts: FakeCall([], error=grpc.StatusCode.UNAVAILABLE)
    d = dispatcher(FakePool(servers), retry_budget_floor=2, retry_budget_ratio=0.0,
                   backoff_base_s=0.0)
    codes = []
    for _ in range(4):
        with pytest.raises(RouteError) as info:
            await collect(d, ask(SIX, 6))
        codes.append(info.value.message)
    assert "every attempt failed" in codes[0]  # 2 retries fit the floor
    assert all("retry budget" in m for m in codes[1:])
    calls = sum(len(s.calls) for s in servers.values())
    assert calls == 3 + 1 + 1 + 1  # later requests get one attempt each


async def test_invalid_and_unknown_inputs_are_precise():
    d = dispatcher(FakePool({"a": FakeServer()}))
    with pytest.raises(RouteError) as info:
        await collect(d, ask("", 6))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(RouteError) as info:
        await collect(d, inference_pb2.GenerateRequest(model="nope", prompt="x"))
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "echo" in info.value.message


async def test_priorities_when_every_server_is_saturated():
    pool = FakePool({"a": FakeServer(), "b": FakeServer()})
    d = dispatcher(pool, queue_size=1)
    pool.saturate("a", 2)
    pool.saturate("b", 2)
    shed = ask(SIX, 6, priority=common_pb2.PRIORITY_SHEDDABLE)
    with pytest.raises(RouteError) as info:
        await collect(d, shed)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.trailers == (("retry-after-ms", "1000"),)
    assert "retry after 1000 ms" in info.value.message
    crit = ask(SIX, 2, priority=common_pb2.PRIORITY_CRITICAL)
    assert merge_chunks(await collect(d, crit)).text == "a b"
    # STANDARD waits with its deadline ...
    with pytest.raises(RouteError) as info:
        await collect(d, ask(SIX, 6), timeout=0.1)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # ... and goes as soon as a server has room; a second one finds the queue full.
    queued = sample(QUEUED)
    waiting = asyncio.create_task(collect(d, ask(SIX, 2), timeout=5))
    await until(lambda: sample(QUEUED) == queued + 1, 5, "the request to queue in the router")
    with pytest.raises(RouteError) as info:
        await collect(d, ask(SIX, 6), timeout=5)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "queue is full" in info.value.message
    assert not waiting.done()
    pool.saturate("b", 1)
    assert merge_chunks(await asyncio.wait_for(waiting, 5)).text == "a b"


async def test_session_from_metadata_header_keeps_one_server():
    servers = {s: FakeServer() for s in "abcd"}
    d = dispatcher(FakePool(servers), policy="meshserve")
    for _ in range(5):
        await collect(d, ask(SIX, 1), metadata=(("x-session-id", "user-7"),))
    assert sorted(len(s.calls) for s in servers.values()) == [0, 0, 0, 5]
