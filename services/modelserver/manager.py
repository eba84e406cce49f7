"""The models one server holds, following the control plane's placements while serving.

Models pinned on the command line load at start and stay. Placed models load when placed and are
released when the placement goes: a released model takes no new traffic but stays loaded (a
placement coming back is instantly ready) until its memory is needed for a new model or it has
been idle for a while. A model that fails to load is reported FAILED with the reason, and that
report is kept for a back-off period so the leader does not place it here again at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from meshserve.v1 import controlplane_pb2 as cp

from services.common.lifecycle import now_ms, parse_option

from .engine import ModelSpec, create_engine
from .engine.base import Engine, EngineLoad

log = logging.getLogger(__name__)

StatusCallback = Callable[[str, "cp.ModelStatus | None"], None]


@dataclass
class Hosted:
    spec: ModelSpec
    memory_bytes: int
    managed: bool
    state: cp.ModelState = cp.MODEL_STATE_LOADING
    reason: str = ""
    engine: Engine | None = None
    in_flight: int = 0
    released_at: float | None = None
    failed_at: float | None = None
    task: asyncio.Task | None = None

    @property
    def serving(self) -> bool:
        return self.state == cp.MODEL_STATE_READY and self.released_at is None


def spec_from_placement(spec: cp.ModelSpec, defaults: dict | None = None) -> ModelSpec:
    """The engine spec for a placement; the server's own engine options are defaults that the
    deployment's options override (e.g. threads suited to this machine)."""
    options = dict(defaults or {})
    options.update(parse_option(f"{k}={v}") for k, v in spec.options.items())
    return ModelSpec(name=spec.name, backend=spec.backend or "sim", source=spec.source or "embedded",
                     options=options)


class ModelManager:
    def __init__(self, server_id: str, pinned: list[ModelSpec], memory_budget: int = 0,
                 on_status: StatusCallback | None = None, idle_unload_s: float = 300.0,
                 failure_backoff_s: float = 60.0, default_options: dict | None = None) -> None:
        names = [s.name for s in pinned]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate model names in {names}")
        self.server_id = server_id
        self.memory_budget = memory_budget
        self.idle_unload_s = idle_unload_s
        self.failure_backoff_s = failure_backoff_s
        self._pinned = pinned
        self._default_options = dict(default_options or {})
        self._on_status = on_status or (lambda name, status: None)
        self.models: dict[str, Hosted] = {}
        self._desired: dict[str, cp.ModelSpec] = {}
        self._lock = asyncio.Lock()
        self._idle = asyncio.Event()

    # --- queries (the request path) ----------------------------------------------------------

    def get(self, model: str) -> Engine | None:
        """The engine, if the model takes traffic here."""
        hosted = self.models.get(model)
        return hosted.engine if hosted is not None and hosted.serving else None

    @contextlib.contextmanager
    def track(self, model: str) -> Iterator[None]:
        hosted = self.models[model]
        hosted.in_flight += 1
        self._idle.clear()
        try:
            yield
        finally:
            hosted.in_flight -= 1
            if not self.in_flight():
                self._idle.set()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (a drain); False when `timeout` ran out first."""
        if not self.in_flight():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def ready_models(self) -> list[str]:
        return sorted(n for n, h in self.models.items() if h.serving)

    def loads(self) -> list[EngineLoad]:
        return [h.engine.load() for h in self.models.values() if h.engine is not None and h.serving]

    def in_flight(self) -> int:
        return sum(h.in_flight for h in self.models.values())

    @property
    def backend(self) -> str:
        return ",".join(sorted({h.spec.backend for h in self.models.values() if h.serving}))

    @property
    def simulated(self) -> bool:
        return any(h.engine.simulated for h in self.models.values() if h.engine and h.serving)

    def memory_used(self) -> int:
        return sum(h.memory_bytes for h in self.models.values() if h.state != cp.MODEL_STATE_FAILED)

    # --- lifecycle ---------------------------------------------------------------------------

    async def start_pinned(self) -> None:
        """Load command-line models before the server registers; a failure here is fatal."""
        for spec in self._pinned:
            hosted = Hosted(spec, 0, managed=False)
            self.models[spec.name] = hosted
            await self._load(hosted)
            if hosted.state != cp.MODEL_STATE_READY:
                raise RuntimeError(f"model {spec.name} failed to load: {hosted.reason}")

    async def stop(self) -> None:
        for hosted in self.models.values():
            if hosted.task is not None:
                hosted.task.cancel()
        engines = [h.engine for h in self.models.values() if h.engine is not None]
        await asyncio.gather(*(e.stop() for e in engines), return_exceptions=True)

    def set_placements(self, desired: dict[str, cp.ModelSpec]) -> None:
        """The latest placements for this server (model -> spec); reconcile() acts on them."""
        self._desired = dict(desired)

    async def reconcile(self) -> None:
        async with self._lock:
            self._release_undesired()
            for name, spec in self._desired.items():
                self._ensure(name, spec)
            await self._collect_garbage()

    # --- internals ---------------------------------------------------------------------------

    def _publish(self, name: str, hosted: Hosted | None) -> None:
        if hosted is None or (hosted.released_at is not None and hosted.state == cp.MODEL_STATE_READY):
            self._on_status(name, None)
            return
        engine = hosted.engine
        self._on_status(name, cp.ModelStatus(server_id=self.server_id, model=name,
                                             state=hosted.state, reason=hosted.reason,
                                             since_ms=now_ms(), managed=hosted.managed,
                                             backend=hosted.spec.backend,
                                             simulated=engine.simulated if engine is not None else False))

    def _set(self, name: str, hosted: Hosted, state: cp.ModelState, reason: str = "") -> None:
        hosted.state, hosted.reason = state, reason
        if state == cp.MODEL_STATE_FAILED:
            hosted.failed_at = time.monotonic()
        self._publish(name, hosted)

    def _release_undesired(self) -> None:
        for name, hosted in list(self.models.items()):
            if not hosted.managed or name in self._desired:
                continue
            if hosted.state == cp.MODEL_STATE_LOADING and hosted.task is not None:
                log.info("placement of %s withdrawn while loading; cancelling", name)
                hosted.task.cancel()
                del self.models[name]
                self._publish(name, None)
            elif hosted.state == cp.MODEL_STATE_READY and hosted.released_at is None:
                log.info("placement of %s released; it stays loaded while idle", name)
                hosted.released_at = time.monotonic()
                self._publish(name, hosted)

    def _ensure(self, name: str, spec: cp.ModelSpec) -> None:
        hosted = self.models.get(name)
        if hosted is not None:
            if hosted.released_at is not None and hosted.state == cp.MODEL_STATE_READY:
                log.info("model %s placed again; it was still loaded", name)
                hosted.released_at = None
                self._publish(name, hosted)
            return  # loading, ready or failed (the leader moves failed ones elsewhere)
        engine_spec = spec_from_placement(spec, self._default_options)
        hosted = Hosted(engine_spec, spec.memory_bytes, managed=True)
        self.models[name] = hosted
        shortfall = self._make_room(spec.memory_bytes, exclude=name)
        if shortfall:
            self._set(name, hosted, cp.MODEL_STATE_FAILED, shortfall)
            return
        self._set(name, hosted, cp.MODEL_STATE_LOADING)
        hosted.task = asyncio.get_running_loop().create_task(self._load(hosted))

    def _make_room(self, need: int, exclude: str) -> str:
        """Evict idle released models (oldest release first) until `need` fits; '' when it fits."""
        if not self.memory_budget or not need:
            return ""
        used = self.memory_used() - self.models[exclude].memory_bytes
        released = sorted((h.released_at, n) for n, h in self.models.items()
                          if h.released_at is not None and h.in_flight == 0 and n != exclude)
        for _, victim in released:
            if used + need <= self.memory_budget:
                break
            log.info("unloading released model %s to make room", victim)
            used -= self.models[victim].memory_bytes
            self._unload(victim)
        if used + need <= self.memory_budget:
            return ""
        return (f"not enough memory on {self.server_id}: needs {need} bytes, "
                f"{max(0, self.memory_budget - used)} of {self.memory_budget} free")

    def _unload(self, name: str) -> None:
        hosted = self.models.pop(name)
        self._publish(name, None)
        if hosted.engine is not None:
            asyncio.get_running_loop().create_task(hosted.engine.stop())

    async def _load(self, hosted: Hosted) -> None:
        name = hosted.spec.name
        log.info("loading model %s (backend %s, source %s)", name, hosted.spec.backend,
                 hosted.spec.source)
        try:
            engine = create_engine(hosted.spec)
            await engine.start()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the control plane, not fatal
            log.error("model %s failed to load: %s", name, exc)
            self._set(name, hosted, cp.MODEL_STATE_FAILED, f"{type(exc).__name__}: {exc}")
            return
        if self.models.get(name) is not hosted:  # withdrawn meanwhile
            await engine.stop()
            return
        hosted.engine = engine
        self._set(name, hosted, cp.MODEL_STATE_READY)
        log.info("model %s ready", name)

    async def _collect_garbage(self) -> None:
        now = time.monotonic()
        for name, hosted in list(self.models.items()):
            if not hosted.managed or name in self._desired:
                continue
            if hosted.state == cp.MODEL_STATE_FAILED and hosted.failed_at is not None \
                    and now - hosted.failed_at >= self.failure_backoff_s:
                del self.models[name]
                self._publish(name, None)
            elif hosted.released_at is not None and hosted.in_flight == 0 \
                    and now - hosted.released_at >= self.idle_unload_s:
                log.info("unloading %s after %.0fs idle since release", name, now - hosted.released_at)
                self._unload(name)
