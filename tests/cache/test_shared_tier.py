"""The shared KV tier with the real model and a real store: blocks one engine computed are fetched
by another instead of computed (greedy output identical), never across tenants (opt-in public
system prompt aside), and a store that is down or holds a bad block only costs a recompute."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import torch
from prometheus_client import REGISTRY

from services.cache import metrics, runtime
from services.modelserver.engine.base import ChatMessage, GenerationRequest, SamplingParams
from services.modelserver.torch_engine import TorchEngine, TorchEngineConfig
from tests.helpers import wait_for

pytestmark = pytest.mark.model

torch.set_num_threads(2)
PROMPT = "Here is a list of facts about rivers and mountains. " * 18  # ~200 tokens: 3 full blocks
MODEL = "smolcache"


def _config() -> TorchEngineConfig:
    return TorchEngineConfig(dtype="float32", threads=2, kv_cache_blocks=48, max_running=8,
                             step_token_budget=512, max_context=1024, warmup=False)


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def engines(loop, redis_server) -> Iterator[tuple[TorchEngine, TorchEngine]]:
    """Two engines of one model (two servers) sharing the store; the cache runtime is set first."""
    runtime.configure(redis_server.url, secret="test-secret")
    a, b = TorchEngine(MODEL, "embedded", _config()), TorchEngine(MODEL, "embedded", _config())
    loop.run_until_complete(a.start())
    loop.run_until_complete(b.start())
    yield a, b
    loop.run_until_complete(a.stop())
    loop.run_until_complete(b.stop())
    runtime.configure("")


@pytest.fixture
def fresh(engines, redis_server, loop):
    """Empty local pools and an empty store before each test."""
    client = redis_server.client()
    client.flushall()
    client.close()
    runtime.configure(redis_server.url, secret="test-secret")
    for e in engines:  # as `meshctl cache flush` does; the tiers keep their Store: point it back
        loop.run_until_complete(e.on_core_thread(e.cache.flush_local))
        e.cache.tier.forget_known()
        e.cache.tier.store = runtime.store()
    return engines


def _generate(loop, engine: TorchEngine, prompt: str = PROMPT, tenant: str = "",
              messages: list[ChatMessage] | None = None, share: bool = False) -> tuple[list[int], int]:
    """Greedy token ids and the prompt tokens the engine did not compute."""
    async def go() -> tuple[list[int], int]:
        req = GenerationRequest(request_id="t", model=MODEL, prompt=None if messages else prompt,
                                messages=messages, sampling=SamplingParams(max_tokens=4), tenant=tenant,
                                share_system_prompt=share)
        ids, cached = [], -1
        async for chunk in engine.generate(req):
            ids += chunk.token_ids
            if chunk.usage is not None:
                cached = chunk.usage.cached_tokens
        return ids, cached
    return loop.run_until_complete(go())


def _shared(model: str = MODEL):
    return metrics.tier_stats(model, "shared")


def _written(engine: TorchEngine, n: int) -> None:
    wait_for(lambda: engine.cache.events.sizes()[1] >= n, 30, f"{n} blocks written to the shared tier")


def test_blocks_computed_on_one_server_are_fetched_by_another(fresh, loop):
    a, b = fresh
    reference, cached = _generate(loop, a)
    assert cached == 0
    _written(a, 3)
    hits = _shared().hits
    ids, cached = _generate(loop, b)
    assert ids == reference  # greedy output identical to computing
    assert cached >= 3 * 64 and _shared().hits - hits >= 3
    assert REGISTRY.get_sample_value("meshserve_cache_hits_total", {"model": MODEL, "tier": "shared"}) >= 3


def test_no_hit_across_tenants_with_interleaved_requests(fresh, loop):
    a, b = fresh
    hits = _shared().hits
    _, cached = _generate(loop, a, tenant="acme")
    _written(a, 3)
    for tenant in ("globex", "initech"):  # interleaved: acme's blocks are in the store and a's pool
        _, cached = _generate(loop, b, tenant=tenant)
        assert cached == 0
        _, cached = _generate(loop, a, tenant=tenant + "x")
        assert cached == 0
    assert _shared().hits == hits  # not one cross-tenant hit
    _, cached = _generate(loop, b, tenant="acme")
    assert cached >= 3 * 64  # within the tenant it hits


def test_a_public_system_prompt_is_shared_only_when_opted_in(fresh, loop):
    a, b = fresh
    system = ChatMessage("system", PROMPT)
    ask = [system, ChatMessage("user", "Name one river.")]
    _, cached = _generate(loop, a, tenant="acme", messages=ask, share=True)
    _written(a, 3)
    _, cached = _generate(loop, b, tenant="globex", messages=ask, share=True)
    assert cached >= 2 * 64  # the system prompt's full blocks are public
    _, cached = _generate(loop, b, tenant="initech", messages=ask)  # not opted in: its own salt
    assert cached == 0


def test_a_store_that_is_down_or_a_bad_block_costs_only_a_recompute(fresh, loop, redis_server):
    a, b = fresh
    reference, _ = _generate(loop, a)
    _written(a, 3)
    client = redis_server.client()
    names = sorted(k for k in client.keys("ms:kv1:*"))
    assert names
    for name in names:  # same length, one byte of the token ids flipped: must not verify
        value = bytearray(client.get(name))
        value[100] ^= 0xFF
        client.set(name, bytes(value))
    client.close()
    rejected = _shared().errors
    ids, cached = _generate(loop, b)
    assert ids == reference and cached == 0 and _shared().errors > rejected
    # the store goes away: b computes as before, says so in metrics
    runtime.configure("redis://127.0.0.1:1/0")
    b.cache.tier.store = runtime.store()
    loop.run_until_complete(b.on_core_thread(b.cache.flush_local))
    ids, cached = _generate(loop, b)
    assert ids == reference and cached == 0
    assert REGISTRY.get_sample_value("meshserve_cache_store_up") == 0.0
