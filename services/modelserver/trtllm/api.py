"""The few names MeshServe takes from tensorrt_llm, gathered in one object.

The engine never imports tensorrt_llm at module import: `import_api()` does it in start(), on a
machine with a CUDA GPU, and tests hand the engine a fake `TrtApi` instead. Every call the engine
makes into TensorRT-LLM goes through this object, so the contract test (contract.py) can check
exactly these names against the pinned version.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from ..engine.base import EngineUnavailableError

log = logging.getLogger(__name__)

#: The TensorRT-LLM release this backend is written and contract-tested against (pyproject's
#: `tensorrt-llm` extra pins the same version).
PINNED_VERSION = "1.3.0rc27"

MISSING = ("tensorrt_llm is not installed; it needs an NVIDIA GPU with CUDA and the tensorrt-llm "
           f"package ({PINNED_VERSION}, see README). Use backend torch on this machine.")


@dataclass(frozen=True)
class TrtApi:
    """LLM, SamplingParams and the config classes of one tensorrt_llm installation."""

    version: str
    LLM: Any
    SamplingParams: Any
    KvCacheConfig: Any
    SchedulerConfig: Any = None
    #: tensorrt_llm.llmapi.WaitingQueuePolicy where this version has the priority queue.
    WaitingQueuePolicy: Any = None
    #: The pydantic model behind LLM(**kwargs) on the PyTorch backend (TorchLlmArgs): its fields are
    #: what the constructor accepts.
    LlmArgs: Any = None
    #: Errors that mean "this request is wrong" (RequestError and friends): INVALID_ARGUMENT.
    request_errors: tuple[type[BaseException], ...] = field(default=(ValueError,))


def _cuda_visible() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def import_api() -> TrtApi:
    """The installed tensorrt_llm as a TrtApi, or EngineUnavailableError saying why it cannot run."""
    try:
        import tensorrt_llm
        from tensorrt_llm import llmapi
    except ImportError as e:
        raise EngineUnavailableError(MISSING) from e
    if not _cuda_visible():
        raise EngineUnavailableError("tensorrt_llm is installed but no CUDA GPU is visible; use backend torch")
    version = str(getattr(tensorrt_llm, "__version__", "unknown"))
    if version != PINNED_VERSION:
        log.warning("tensorrt_llm %s is installed; MeshServe is tested against %s (run the contract "
                    "test: python -m services.modelserver.trtllm.contract)", version, PINNED_VERSION)
    errors: tuple[type[BaseException], ...] = (ValueError,)
    try:
        from tensorrt_llm.executor.utils import RequestError

        errors = (RequestError, ValueError)
    except ImportError:
        log.warning("tensorrt_llm %s has no executor.utils.RequestError; only ValueError is a request error",
                    version)
    policy = getattr(llmapi, "WaitingQueuePolicy", None)
    if policy is None:
        try:
            from tensorrt_llm.llmapi import llm_args

            policy = getattr(llm_args, "WaitingQueuePolicy", None)
        except ImportError:
            policy = None
    return TrtApi(version=version, LLM=llmapi.LLM, SamplingParams=llmapi.SamplingParams,
                  KvCacheConfig=llmapi.KvCacheConfig, SchedulerConfig=getattr(llmapi, "SchedulerConfig", None),
                  WaitingQueuePolicy=policy, LlmArgs=getattr(llmapi, "TorchLlmArgs", None),
                  request_errors=errors)


def field_names(cls: Any) -> frozenset[str]:
    """Keyword names a TensorRT-LLM class or function accepts: pydantic fields (LlmArgs, KvCacheConfig,
    SchedulerConfig), dataclass fields (SamplingParams) or, failing both, its signature."""
    if cls is None:
        return frozenset()
    fields = getattr(cls, "model_fields", None)
    if isinstance(fields, dict):
        return frozenset(fields)
    fields = getattr(cls, "__dataclass_fields__", None)
    if isinstance(fields, dict):
        return frozenset(name for name, f in fields.items() if getattr(f, "init", True) and not name.startswith("_"))
    import inspect

    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return frozenset()
    return frozenset(n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self")
