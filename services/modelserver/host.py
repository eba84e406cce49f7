"""The models one server holds: one engine per model, started and stopped together.

The control-plane issue adds load/unload while serving; callers only see `get` and `models`.
"""

from __future__ import annotations

import asyncio
import logging

from .engine import ModelSpec, create_engine
from .engine.base import Engine, EngineLoad

log = logging.getLogger(__name__)


class ModelHost:
    def __init__(self, specs: list[ModelSpec]) -> None:
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in {names}")
        self._specs = {s.name: s for s in specs}
        self._engines: dict[str, Engine] = {}

    @property
    def specs(self) -> list[ModelSpec]:
        return list(self._specs.values())

    async def start(self) -> None:
        for spec in self._specs.values():
            engine = create_engine(spec)
            log.info("loading model %s (backend %s, source %s)", spec.name, spec.backend, spec.source)
            await engine.start()
            self._engines[spec.name] = engine
            log.info("model %s ready", spec.name)

    async def stop(self) -> None:
        await asyncio.gather(*(e.stop() for e in self._engines.values()), return_exceptions=True)

    def get(self, model: str) -> Engine | None:
        return self._engines.get(model)

    def models(self) -> list[str]:
        return sorted(self._engines)

    def ready(self) -> bool:
        return bool(self._engines) and all(e.ready for e in self._engines.values())

    def loads(self) -> list[EngineLoad]:
        return [e.load() for e in self._engines.values()]

    @property
    def backend(self) -> str:
        backends = sorted({s.backend for s in self._specs.values()})
        return ",".join(backends)

    @property
    def simulated(self) -> bool:
        return any(e.simulated for e in self._engines.values())
