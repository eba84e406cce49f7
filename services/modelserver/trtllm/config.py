"""How a TensorRT-LLM model is configured, matched to how our torch engine runs.

Chunked prefill with a bounded step (`max_num_tokens`) so a long prompt never stalls decoding for
long; KV block reuse with the block size the routers' prefix index assumes (64 characters, about 16
tokens); the priority waiting queue so `priority` orders admission as in our engines; iteration
stats and KV-cache events on, because load reports and the shared prefix index read them.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..engine.options import check_values
from .api import TrtApi, field_names

log = logging.getLogger(__name__)

#: Tokens per KV block: what the router's 64-character prefix blocks approximate.
ROUTER_BLOCK_TOKENS = 16


@dataclass(frozen=True)
class TrtllmConfig:
    #: prompt + generated tokens per sequence (TensorRT-LLM's max_seq_len).
    max_context: int = 4096
    #: sequences running at once (max_batch_size).
    max_running: int = 64
    #: tokens computed per iteration, decode tokens plus prefill chunks; 0 = min(2048, max_context).
    max_num_tokens: int = 0
    #: share of free GPU memory given to the KV cache.
    kv_cache_fraction: float = 0.85
    #: tokens per KV block; a power of two (TensorRT-LLM's requirement).
    block_size: int = ROUTER_BLOCK_TOKENS
    enable_chunked_prefill: bool = True
    #: order the waiting queue by request priority (needs a version with WaitingQueuePolicy).
    priority_queue: bool = True
    #: KV-cache events kept by TensorRT-LLM until read; 0 turns the event stream off.
    kv_event_buffer: int = 4096
    #: how long one get_stats_async / get_kv_cache_events_async read waits for data.
    poll_timeout_s: float = 2.0
    #: stats older than this describe the past: load falls back to what this engine knows.
    stats_stale_s: float = 2.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrtllmConfig:
        """Our options from a model spec; options meant for other backends (a server's defaults
        for torch, say) are ignored with a warning rather than failing the load."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            log.warning("tensorrt_llm engine ignores options %s (it knows %s)", unknown, sorted(known))
        cfg = cls(**{k: v for k, v in options.items() if k in known})
        check_values("tensorrt_llm", asdict(cfg))  # InvalidArgument naming the option
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in ("max_context", "max_running"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.max_num_tokens <= self.max_context:
            raise ValueError(f"max_num_tokens must be in [0, max_context={self.max_context}], "
                             f"got {self.max_num_tokens}")
        if self.block_size < 2 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 2, got {self.block_size}")
        if not 0.0 < self.kv_cache_fraction <= 1.0:
            raise ValueError(f"kv_cache_fraction must be in (0, 1], got {self.kv_cache_fraction}")
        if self.kv_event_buffer < 0 or self.poll_timeout_s <= 0 or self.stats_stale_s <= 0:
            raise ValueError("kv_event_buffer must be >= 0, poll_timeout_s and stats_stale_s > 0")

    @property
    def step_tokens(self) -> int:
        return self.max_num_tokens or min(2048, self.max_context)


def _only_known(cls: Any, kwargs: dict[str, Any], what: str) -> dict[str, Any]:
    """Drop (and report) settings this TensorRT-LLM version does not have; a version without
    field information gets everything and fails loudly at construction instead."""
    known = field_names(cls)
    if not known:
        return kwargs
    dropped = sorted(set(kwargs) - known)
    if dropped:
        log.warning("tensorrt_llm %s has no %s; running without them", what, dropped)
    return {k: v for k, v in kwargs.items() if k in known}


def llm_kwargs(cfg: TrtllmConfig, api: TrtApi) -> dict[str, Any]:
    """Keyword arguments for tensorrt_llm.LLM(model=..., **these) on the PyTorch backend."""
    kv = _only_known(api.KvCacheConfig, {
        "enable_block_reuse": True, "free_gpu_memory_fraction": cfg.kv_cache_fraction,
        "tokens_per_block": cfg.block_size, "event_buffer_max_size": cfg.kv_event_buffer,
    }, "KvCacheConfig fields")
    args: dict[str, Any] = {
        "max_seq_len": cfg.max_context, "max_batch_size": cfg.max_running, "max_num_tokens": cfg.step_tokens,
        "enable_chunked_prefill": cfg.enable_chunked_prefill, "enable_iter_perf_stats": True,
        "kv_cache_config": api.KvCacheConfig(**kv),
    }
    if cfg.priority_queue:
        sched = scheduler_config(api)
        if sched is not None:
            args["scheduler_config"] = sched
    return _only_known(api.LlmArgs, args, "LLM arguments")


def scheduler_config(api: TrtApi) -> Any:
    """SchedulerConfig with the priority waiting queue, or None (with a warning) where this version
    orders its queue first come, first served only."""
    if api.SchedulerConfig is None or "waiting_queue_policy" not in field_names(api.SchedulerConfig):
        log.warning("tensorrt_llm %s has no priority waiting queue: request priority is ordered only by "
                    "the routers' admission on this backend", api.version)
        return None
    policy = api.WaitingQueuePolicy.PRIORITY if api.WaitingQueuePolicy is not None else "priority"
    return api.SchedulerConfig(waiting_queue_policy=policy)
