"""Engine backends behind one interface; `create_engine` is the only place that knows them."""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.names import check_model_name

from .base import Engine
from .options import check_backend, validate_options


@dataclass(frozen=True)
class ModelSpec:
    """What a server should load: a name clients use, a backend and where the weights are."""

    name: str
    backend: str = "sim"
    # "embedded" (the packaged SmolLM2), a .gguf file, or a Hugging Face-style folder.
    source: str = "embedded"
    # Engine options as text (or already typed); create_engine checks them against the schema.
    options: dict = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """NAME[=BACKEND[:SOURCE]], e.g. 'smollm2=torch:embedded' or 'echo=sim'."""
        name, _, rest = text.partition("=")
        backend, _, source = rest.partition(":")
        spec = cls(name=name.strip(), backend=(backend or "sim").strip(),
                   source=(source or "embedded").strip())
        check_model_name(spec.name)
        check_backend(spec.backend)
        return spec


def create_engine(spec: ModelSpec) -> Engine:
    """Checks the options against the backend's schema (InvalidArgument naming a bad one), then
    imports the backend; torch and tensorrt_llm are heavy, so only when chosen."""
    options = validate_options(spec.backend, spec.options, allow_server_only=True)
    if spec.backend == "sim":
        from .sim import SimConfig, SimEngine
        return SimEngine(spec.name, SimConfig(**options))  # type: ignore[arg-type]
    if spec.backend == "torch":
        from services.modelserver.torch_engine.config import TorchEngineConfig
        from services.modelserver.torch_engine.engine import TorchEngine
        return TorchEngine(spec.name, spec.source, TorchEngineConfig(**options))  # type: ignore[arg-type]
    from services.modelserver.trtllm.engine import TensorRTLLMEngine
    return TensorRTLLMEngine(spec.name, spec.source, **options)  # type: ignore[arg-type]
