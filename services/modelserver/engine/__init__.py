"""Engine backends behind one interface; `create_engine` is the only place that knows them."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.validation import BACKENDS

from .base import Engine


@dataclass(frozen=True)
class ModelSpec:
    """What a server should load: a name clients use, a backend and where the weights are."""

    name: str
    backend: str = "sim"
    # "embedded" (the packaged SmolLM2), a .gguf file, or a Hugging Face-style folder.
    source: str = "embedded"
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """NAME[=BACKEND[:SOURCE]], e.g. 'smollm2=torch:embedded' or 'echo=sim'."""
        name, _, rest = text.partition("=")
        backend, _, source = rest.partition(":")
        spec = cls(name=name.strip(), backend=(backend or "sim").strip(),
                   source=(source or "embedded").strip())
        if not spec.name:
            raise ValueError(f"model spec {text!r} has no name")
        if spec.backend not in BACKENDS:
            raise ValueError(f"model {spec.name}: unknown backend {spec.backend!r}; "
                             f"choose one of {', '.join(BACKENDS)}")
        return spec


def create_engine(spec: ModelSpec) -> Engine:
    """Imports each backend only when it is chosen (torch and tensorrt_llm are heavy)."""
    if spec.backend == "sim":
        from .sim import SimConfig, SimEngine
        return SimEngine(spec.name, SimConfig(**spec.options))
    if spec.backend == "torch":
        from services.modelserver.torch_engine.config import TorchEngineConfig
        from services.modelserver.torch_engine.engine import TorchEngine
        return TorchEngine(spec.name, spec.source, TorchEngineConfig(**spec.options))
    if spec.backend == "tensorrt_llm":
        from services.modelserver.trtllm.engine import TensorRTLLMEngine
        return TensorRTLLMEngine(spec.name, spec.source, **spec.options)
    raise ValueError(f"unknown backend {spec.backend!r}")
