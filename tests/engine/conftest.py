"""Shared fixtures: one real SmolLM2 engine per session, driven from a private event loop."""

from __future__ import annotations

import asyncio
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(2)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "model: loads the real SmolLM2 weights (slower)")


class LoopRunner:
    """Runs coroutines on one long-lived loop so the session engine keeps its loop-bound state."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def __call__(self, coro):
        return self.loop.run_until_complete(coro)

    def close(self) -> None:
        self.loop.close()


@pytest.fixture(scope="session")
def run():
    runner = LoopRunner()
    yield runner
    runner.close()


@pytest.fixture(scope="session")
def smol(run):
    """A started TorchEngine on the embedded SmolLM2 GGUF (float32 so it matches transformers)."""
    from services.modelserver.torch_engine import TorchEngine, TorchEngineConfig

    cfg = TorchEngineConfig(dtype="float32", threads=2, kv_cache_blocks=64, max_running=16,
                            step_token_budget=256, max_context=2048)
    engine = TorchEngine("smollm2", "embedded", cfg)
    run(engine.start())
    yield engine
    run(engine.stop())


@pytest.fixture(params=["torch", "kernel"])
def kernels(request: pytest.FixtureRequest):
    """The C++ kernels module, or None for the plain-torch path: a test taking it runs on both
    (the kernel case skips when the op is not built)."""
    from services.modelserver.torch_engine import ops

    if request.param == "torch":
        return None
    mod = ops.load()
    if mod is None:
        pytest.skip(f"C++ ops not built: {ops.status()}")
    return mod
