"""PyTorch inference engine: continuous batching over a paged KV cache with automatic prefix caching."""

from .config import TorchEngineConfig
from .engine import TorchEngine

__all__ = ["TorchEngine", "TorchEngineConfig"]
