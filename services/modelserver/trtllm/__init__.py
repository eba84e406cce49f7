"""TensorRT-LLM backend: a thin adapter over tensorrt_llm.LLM (imported only when started)."""

from .engine import TensorRTLLMEngine

__all__ = ["TensorRTLLMEngine"]
