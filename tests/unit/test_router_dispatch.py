"""Dispatcher: retries, migration, abandoned attempts, budgets, shedding, resume - on fake
replicas (no sockets)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest
from meshserve.v1 import common_pb2, inference_pb2, modelserver_pb2

from services.common.errors import ServiceError
from services.common.validation import validate_request
from services.router import metrics
from services.router.config import DispatchSettings
from services.router.convert import merge_chunks
from services.router.dispatch import Dispatcher
from services.router.replica import Replica, ServerLink

MODEL = "echo"


def words_of(req) -> list[str]:
    text = req.prompt or " ".join(m.content for m in req.messages)
    return text.split()


class FakeCall:
    """Scripted upstream stream: `parts` chunks, then an error, a hang, or the end."""

    def __init__(self, parts: list, error: grpc.StatusCode | None = None, hang: bool = False,
                 script: Callable | None = None) -> None:
        self._parts, self._error, self._hang, self._script = parts, error, hang, script
        self._cancelled = asyncio.Event()
        self._done = False

    def __aiter__(self):
        return self._script() if self._script else self._gen()

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

    def __init__(self) -> None:
        self.calls: list[modelserver_pb2.ModelServerServiceGenerateRequest] = []
        self.script: Callable[[list], FakeCall] | None = None

    def Generate(self, request, timeout=None):
        self.calls.append(request)
        words = words_of(request)
        start = len(request.resume_token_ids)
        n = request.sampling.max_tokens
        parts = []
        for i in range(start, n):
            part = modelserver_pb2.ModelServerServiceGenerateResponse(
                text=words[i % len(words)] if i == 0 else " " + words[i % len(words)], token_ids=[100 + i])
            if i + 1 == n:
                part.finish_reason = common_pb2.FINISH_REASON_LENGTH
                part.usage.prompt_tokens = len(words)
                part.usage.completion_tokens = n  # the model server counts resumed tokens too
            parts.append(part)
        return self.script(parts) if self.script else FakeCall(parts)


class FakeChannel:
    def __init__(self) -> None:
        self.state = grpc.ChannelConnectivity.READY

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.state


class FakePool:
    def __init__(self, servers: dict[str, FakeServer]) -> None:
        self.replicas = {}
        for sid, stub in servers.items():
            link = ServerLink(info=modelserver_pb2.ServerInfo(server_id=sid, region="local"),
                              channel=FakeChannel(), stub=stub)  # type: ignore[arg-type]
            self.replicas[sid] = link.replicas[MODEL] = Replica(link, MODEL, backend="sim", simulated=True)
        self.policy_record = None
        self.listeners: list = []

    def on_change(self, f) -> None:
        self.listeners.append(f)

    def on_leave(self, f) -> None:
        pass

    def on_kv_events(self, f) -> None:
        pass

    def known_models(self) -> frozenset[str]:
        return frozenset({MODEL})

    def candidates(self, model: str) -> list[Replica]:
        return list(self.replicas.values()) if model == MODEL else []

    def scales_from_zero(self, model: str) -> bool:
        return False

    def saturate(self, sid: str, running: int, max_running: int = 2) -> None:
        self.replicas[sid].set_report(modelserver_pb2.ModelLoad(model=MODEL, running=running,
                                                                max_running=max_running))
        for f in self.listeners:
            f()


def ask(prompt="a b c d e f", max_tokens=6, **kw) -> inference_pb2.GenerateRequest:
    r = inference_pb2.GenerateRequest(model=MODEL, prompt=prompt, **kw)
    r.sampling.max_tokens = max_tokens
    return r


async def collect(d: Dispatcher, request, timeout=5.0, metadata=None) -> list:
    return [c async for c in d.stream(validate_request(request), timeout, metadata)]


def dispatcher(pool, **kw) -> Dispatcher:
    kw.setdefault("policy", "round_robin")  # deterministic order: a, then b, ...
    return Dispatcher(pool, "r0", DispatchSettings(**kw))


def counter(metric, *labels) -> float:
    return metric.labels(*labels)._value.get()  # noqa: SLF001 - reading a test counter


async def test_mid_stream_failure_migrates_and_the_client_sees_one_answer():
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall(parts[:3], error=grpc.StatusCode.UNAVAILABLE)
    pool = FakePool({"a": a, "b": b})
    before = counter(metrics.MIGRATIONS, MODEL)
    chunks = await collect(dispatcher(pool), ask())
    whole = merge_chunks(chunks)
    assert whole.text == "a b c d e f"
    assert list(whole.token_ids) == [100, 101, 102, 103, 104, 105]
    assert whole.usage.completion_tokens == 6 and whole.usage.prompt_tokens == 6
    assert list(b.calls[0].resume_token_ids) == [100, 101, 102]
    assert [c.served_by.server_id for c in chunks] == ["a"] * 3 + ["b"] * 3
    assert {c.served_by.backend for c in chunks} == {"sim"} and chunks[0].served_by.simulated
    assert counter(metrics.MIGRATIONS, MODEL) == before + 1
    assert pool.replicas["a"].consecutive_failures == 1


async def test_failure_before_first_token_retries_elsewhere():
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall([], error=grpc.StatusCode.UNAVAILABLE)
    chunks = await collect(dispatcher(FakePool({"a": a, "b": b})), ask(max_tokens=2))
    assert merge_chunks(chunks).text == "a b"
    assert not b.calls[0].resume_token_ids


async def test_a_replica_that_no_longer_has_the_model_is_retried_not_passed_through():
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall([], error=grpc.StatusCode.NOT_FOUND)  # released a moment ago
    pool = FakePool({"a": a, "b": b})
    assert merge_chunks(await collect(dispatcher(pool), ask(max_tokens=2))).text == "a b"
    assert pool.replicas["a"].consecutive_failures == 0  # not the server's fault


async def test_silent_server_hits_the_attempt_deadline_and_the_request_moves():
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall([], hang=True)
    d = dispatcher(FakePool({"a": a, "b": b}), first_token_timeout_s=0.05)
    assert merge_chunks(await collect(d, ask(max_tokens=2))).text == "a b"
    # A stall after some tokens migrates.
    a.script = lambda parts: FakeCall(parts[:2], hang=True)
    d = dispatcher(FakePool({"a": a, "b": b}), stall_timeout_s=0.05)
    assert merge_chunks(await collect(d, ask())).text == "a b c d e f"


async def test_an_attempt_the_pool_abandons_migrates_at_once():
    """A server that hangs, leaves or turns NOT_SERVING: the pool aborts its attempts with a
    cause; the stream continues elsewhere without waiting for any timeout."""
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall(parts[:2], hang=True)
    pool = FakePool({"a": a, "b": b})
    d = dispatcher(pool)  # default 30 s stall timeout: only the abort can move it
    stream = d.stream(validate_request(ask()), 10.0)
    chunks = [await stream.__anext__(), await stream.__anext__()]
    assert pool.replicas["a"].link.abort_attempts("its server left the mesh") == 1
    chunks += [c async for c in stream]
    assert merge_chunks(chunks).text == "a b c d e f"
    assert chunks[-1].served_by.server_id == "b"


async def test_an_upstream_call_cancelled_by_nobody_we_know_is_an_attempt_failure():
    """gRPC cancelling calls when a channel closes must not end the client's stream silently."""
    a, b = FakeServer(), FakeServer()
    calls: list[FakeCall] = []

    def script(parts):
        calls.append(FakeCall(parts[:1], hang=True))
        return calls[-1]
    a.script = script
    d = dispatcher(FakePool({"a": a, "b": b}))
    stream = d.stream(validate_request(ask()), 10.0)
    first = await stream.__anext__()
    calls[0].cancel()  # as channel.close() does, with no cause recorded
    rest = [c async for c in stream]
    assert merge_chunks([first, *rest]).text == "a b c d e f"


async def test_request_errors_pass_through_without_retry():
    a, b = FakeServer(), FakeServer()
    a.script = lambda parts: FakeCall([], error=grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(ServiceError) as info:
        await collect(dispatcher(FakePool({"a": a, "b": b})), ask())
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT and not b.calls


async def test_retry_budget_stops_amplification():
    servers = {s: FakeServer() for s in "abc"}
    for s in servers.values():
        s.script = lambda parts: FakeCall([], error=grpc.StatusCode.UNAVAILABLE)
    d = dispatcher(FakePool(servers), retry_budget_floor=2, retry_budget_ratio=0.0, backoff_base_s=0.0)
    messages = []
    for _ in range(4):
        with pytest.raises(ServiceError) as info:
            await collect(d, ask())
        messages.append(info.value.message)
    assert "every attempt failed" in messages[0]  # 2 retries fit the floor
    assert all("retry budget" in m for m in messages[1:])
    assert sum(len(s.calls) for s in servers.values()) == 3 + 1 + 1 + 1  # later ones get one attempt


async def test_many_streams_of_one_dying_server_all_migrate_on_a_tiny_budget():
    a, b = FakeServer(), FakeServer()
    pool = FakePool({"a": a, "b": b})
    gate = asyncio.Event()

    def dying(parts):
        async def script():
            yield parts[0]
            await gate.wait()
            pool.replicas["a"].link.channel.state = grpc.ChannelConnectivity.TRANSIENT_FAILURE
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       details="Socket closed")
        return FakeCall([], script=script)
    a.script = dying
    d = dispatcher(pool, policy="least_load", retry_budget_floor=1, retry_budget_ratio=0.0)
    pool.saturate("b", 50, max_running=100)  # every stream starts on a
    tasks = [asyncio.create_task(collect(d, ask())) for _ in range(20)]
    await asyncio.sleep(0.05)
    gate.set()
    answers = await asyncio.gather(*tasks)
    assert all(merge_chunks(c).text == "a b c d e f" for c in answers)
    assert len(b.calls) == 20


async def test_a_client_resume_continues_after_the_tokens_it_has():
    a = FakeServer()
    chunks = await collect(dispatcher(FakePool({"a": a})), ask(resume_token_ids=[100, 101, 102]))
    assert list(a.calls[0].resume_token_ids) == [100, 101, 102]
    whole = merge_chunks(chunks)
    assert whole.text == " d e f" and list(whole.token_ids) == [103, 104, 105]
    assert whole.usage.completion_tokens == 6


async def test_invalid_and_unknown_inputs_are_precise():
    d = dispatcher(FakePool({"a": FakeServer()}))
    with pytest.raises(ServiceError) as info:
        await collect(d, inference_pb2.GenerateRequest(model="nope", prompt="x"))
    assert info.value.code == grpc.StatusCode.NOT_FOUND and "echo" in info.value.message


async def test_priorities_when_every_server_is_saturated():
    pool = FakePool({"a": FakeServer(), "b": FakeServer()})
    d = dispatcher(pool, queue_size=1)
    pool.saturate("a", 2)
    pool.saturate("b", 2)
    with pytest.raises(ServiceError) as info:
        await collect(d, ask(priority=common_pb2.PRIORITY_SHEDDABLE))
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert info.value.trailers == (("retry-after-ms", "1000"),)
    assert "retry after 1000 ms" in info.value.message
    crit = ask(priority=common_pb2.PRIORITY_CRITICAL, max_tokens=2)
    assert merge_chunks(await collect(d, crit)).text == "a b"
    # STANDARD waits with its deadline ...
    with pytest.raises(ServiceError) as info:
        await collect(d, ask(), timeout=0.1)
    assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # ... and goes as soon as a server has room; a second one finds the queue full.
    waiting = asyncio.create_task(collect(d, ask(max_tokens=2), timeout=5))
    await asyncio.sleep(0.05)
    with pytest.raises(ServiceError) as info:
        await collect(d, ask(), timeout=5)
    assert info.value.code == grpc.StatusCode.UNAVAILABLE and "queue for it is full" in info.value.message
    assert not waiting.done()
    pool.saturate("b", 1)
    assert merge_chunks(await asyncio.wait_for(waiting, 5)).text == "a b"


async def test_session_from_metadata_header_keeps_one_server():
    servers = {s: FakeServer() for s in "abcd"}
    d = dispatcher(FakePool(servers), policy="meshserve")
    for _ in range(5):
        await collect(d, ask(max_tokens=1), metadata=(("x-session-id", "user-7"),))
    assert sorted(len(s.calls) for s in servers.values()) == [0, 0, 0, 5]
