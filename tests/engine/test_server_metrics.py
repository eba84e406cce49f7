"""The model server's Prometheus metrics and load report follow the torch engine's real numbers:
prefix-cache hits, preemptions, tokens/s, and every non-OK status code by name."""

from __future__ import annotations

import contextlib

import pytest
from engine_helpers import chat, collect
from meshserve.v1 import modelserver_pb2
from prometheus_client import REGISTRY

from services.common.errors import NotFound
from services.modelserver.convert import load_to_proto
from services.modelserver.engine.base import EngineLoad, InvalidRequestError
from services.modelserver.servicer import ModelServerServicer

# longer than one 64-token KV page, so a repeat is served partly from the prefix cache
SYSTEM = ("You are a careful assistant for an insurance company. Reply in one plain sentence, "
          "avoid jargon, never give legal advice, and do not use lists or markdown in answers. When a "
          "customer asks about a claim, ask for the claim number first, explain the next step plainly, "
          "and never promise a payout date or amount that the claims team has not confirmed in writing.")


def sample(name: str, model: str) -> float:
    return REGISTRY.get_sample_value(name, {"model": model}) or 0.0


class _Manager:
    """The slice of ModelManager the servicer uses, over fixed engines."""

    def __init__(self, engines: dict) -> None:
        self.engines = engines

    def get(self, model: str):
        return self.engines.get(model)

    def ready_models(self) -> list[str]:
        return list(self.engines)

    def loads(self) -> list[EngineLoad]:
        return [e.load() for e in self.engines.values()]

    @contextlib.contextmanager
    def track(self, model: str):
        yield


def _servicer(engines: dict) -> ModelServerServicer:
    return ModelServerServicer(_Manager(engines),  # type: ignore[arg-type]  # ModelManager's used slice
                               lambda: modelserver_pb2.ServerInfo(server_id="metrics-test"))


@pytest.mark.model
def test_prefix_hits_and_throughput_reach_metrics_and_load_report(smol, run):
    name = "smollm2-metrics"
    servicer = _servicer({name: smol})
    servicer.update_gauges()
    hits_before = sample("meshserve_modelserver_prefix_cache_hit_tokens_total", name)
    for _ in range(2):  # the second request finds the system prompt's blocks cached
        run(collect(smol, chat("Say hello.", system=SYSTEM, max_tokens=8)))
    load = smol.load()
    assert load.prefix_cache_hit_rate > 0
    assert load.prefix_cache_hit_tokens_total > 0
    assert load.preemptions_total == smol.core.scheduler.num_preemptions
    servicer.update_gauges()
    assert sample("meshserve_modelserver_prefix_cache_hit_rate", name) > 0
    assert sample("meshserve_modelserver_prefix_cache_hit_tokens_total", name) > hits_before
    assert sample("meshserve_modelserver_kv_blocks_total", name) == load.kv_blocks_total
    report = servicer.load_report()
    assert report.prefix_cache_hit_rate > 0
    assert report.tokens_per_second > 0  # the requests just ran, well inside the 10 s window


class _FakeEngine:
    """Reports whatever totals the test sets; generate() fails the way the test asks."""

    ready = True

    def __init__(self) -> None:
        self.preemptions = 0
        self.error: Exception | None = None

    def load(self) -> EngineLoad:
        return EngineLoad(0, 0, 3, 10, 4, prefix_cache_hit_rate=0.5, tokens_per_second=7.0,
                          preemptions_total=self.preemptions, prefix_cache_hit_tokens_total=0)

    async def generate(self, request):
        raise self.error or InvalidRequestError("no")
        yield  # pragma: no cover - makes this an async generator


def test_preemptions_counter_follows_engine_total_across_reloads():
    engine = _FakeEngine()
    servicer = _servicer({"fake-preempt": engine})
    key = "meshserve_modelserver_preemptions_total"
    before = sample(key, "fake-preempt")
    engine.preemptions = 3
    servicer.update_gauges()
    engine.preemptions = 5
    servicer.update_gauges()
    servicer.update_gauges()
    assert sample(key, "fake-preempt") - before == 5
    engine.preemptions = 2  # engine reloaded: its total restarted
    servicer.update_gauges()
    assert sample(key, "fake-preempt") - before == 7
    report = load_to_proto("s", {"fake-preempt": engine.load()})
    assert report.prefix_cache_hit_rate == 0.5 and report.tokens_per_second == 7.0
    assert [(m.model, m.kv_blocks_used, m.max_running) for m in report.models] == [("fake-preempt", 3, 4)]


class _Context:
    def time_remaining(self):
        return None

    async def write(self, message) -> None:
        pass


@pytest.mark.parametrize("error, code", [(InvalidRequestError("bad"), "INVALID_ARGUMENT"),
                                         (RuntimeError("bug"), "INTERNAL")])
def test_every_failure_is_counted_by_its_status_code(run, error, code):
    """Errors propagate to the status interceptor (which answers them); metrics count each by the
    status the caller gets - a bug is INTERNAL, never UNKNOWN."""
    engine = _FakeEngine()
    engine.error = error
    servicer = _servicer({"fake-codes": engine})
    req = modelserver_pb2.ModelServerServiceGenerateRequest(model="fake-codes", prompt="hi", request_id="r")
    before = sample_code("fake-codes", code)
    with pytest.raises((InvalidRequestError, RuntimeError)):
        run(servicer.Generate(req, _Context()))
    assert sample_code("fake-codes", code) == before + 1
    missing = modelserver_pb2.ModelServerServiceGenerateRequest(model="nope", prompt="hi", request_id="r")
    before_nf = sample_code("unknown", "NOT_FOUND")
    with pytest.raises(NotFound):
        run(servicer.Generate(missing, _Context()))
    assert sample_code("unknown", "NOT_FOUND") == before_nf + 1


def sample_code(model: str, code: str) -> float:
    return REGISTRY.get_sample_value("meshserve_modelserver_requests_total",
                                     {"model": model, "code": code}) or 0.0
