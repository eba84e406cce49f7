"""The engine interface every backend implements (sim, torch, tensorrt_llm).

Plain Python on purpose: the gRPC servicer converts protobuf to these types at the boundary,
so engines are testable without gRPC and the server never knows which backend it runs. The
request types come from services/common/validation.py and check themselves when built. The
errors are services/common/errors.py's, so the status interceptor maps them.

Usage contract: `completion_tokens` counts every token of the answer, resumed ones included
(the model server enforces it, whatever the backend reports).
"""

from __future__ import annotations

import abc
import enum
import time
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, ResourceExhausted, Unavailable
from services.common.validation import ChatMessage, Priority, SamplingParams, ValidRequest, check_content, check_resume

__all__ = ["CapacityError", "ChatMessage", "Engine", "EngineLoad", "EngineUnavailableError", "FinishReason",
           "GenerationChunk", "GenerationRequest", "InvalidRequestError", "Priority", "SamplingParams", "Timeline",
           "Usage"]


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


class InvalidRequestError(InvalidArgument):
    """The request can never succeed as written (INVALID_ARGUMENT)."""


class CapacityError(ResourceExhausted):
    """The engine cannot take the request now (RESOURCE_EXHAUSTED)."""


class EngineUnavailableError(Unavailable):
    """The engine is not loaded, is stopping, or failed (UNAVAILABLE)."""


@dataclass
class Timeline:
    """When the engine first took the request into its running batch (time.time_ns(); 0 = the
    backend does not say). Engines only write it; tracing reads it to split the wait in the
    engine's queue from prefill."""

    scheduled_ns: int = 0

    def scheduled(self) -> None:
        if not self.scheduled_ns:
            self.scheduled_ns = time.time_ns()


@dataclass
class GenerationRequest:
    """What an engine runs: a validated request plus where it stands (deadline).

    Built from a ValidRequest at the model server (`from_valid`), or directly by engine code and
    tests; either way the shared checks in services/common/validation.py run on construction.
    """

    request_id: str
    model: str
    prompt: str | None = None
    messages: Sequence[ChatMessage] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: Priority = Priority.STANDARD
    # Tokens already produced elsewhere (mid-stream migration or a client's resume); generation
    # continues after them, they count against max_tokens and in usage.completion_tokens.
    resume_token_ids: Sequence[int] = ()
    # time.monotonic() value after which the request is cancelled; None = no deadline.
    deadline: float | None = None
    timeline: Timeline = field(default_factory=Timeline, compare=False, repr=False)
    # Cache scope (services/cache): the tenant salts KV keys and answers; see ValidRequest.
    tenant: str = ""
    share_system_prompt: bool = False
    bypass_response_cache: bool = False

    def __post_init__(self) -> None:
        check_content(self.prompt, self.messages)
        check_resume(self.resume_token_ids, self.sampling.max_tokens)

    @classmethod
    def from_valid(cls, req: ValidRequest, deadline: float | None) -> GenerationRequest:
        return cls(request_id=req.request_id, model=req.model, prompt=req.prompt, messages=req.messages,
                   sampling=req.sampling, priority=req.priority, resume_token_ids=req.resume_token_ids,
                   deadline=deadline, tenant=req.tenant, share_system_prompt=req.share_system_prompt,
                   bypass_response_cache=req.bypass_response_cache)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class GenerationChunk:
    """Tokens produced by one engine step for one request; the last one has finish_reason and usage."""

    text: str
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    cached: bool = False  # the whole answer came from the response cache


@dataclass(frozen=True)
class EngineLoad:
    queue_depth: int
    running: int
    kv_blocks_used: int
    kv_blocks_total: int
    max_running: int
    prefix_cache_hit_rate: float = 0.0  # cached / looked-up prompt tokens since start
    tokens_per_second: float = 0.0  # generated tokens per second, recent window
    # Monotonic totals since start (the server turns their increments into Prometheus counters).
    preemptions_total: int = 0
    prefix_cache_hit_tokens_total: int = 0
    # The backend cannot report queue and KV use: the zeros are unknown, not idle.
    unknown: bool = False


class Engine(abc.ABC):
    """One loaded model with its own batching loop."""

    #: "sim", "torch" or "tensorrt_llm"
    backend: str = ""
    #: True only for the simulated engine: its output is never a model result.
    simulated: bool = False

    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    @abc.abstractmethod
    async def start(self) -> None:
        """Load weights and warm up; the server reports NOT_SERVING until this returns."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Cancel what runs and release memory."""

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """Stream chunks for one request.

        Raises InvalidRequestError (before any chunk) for bad input. Closing the iterator or
        cancelling the consuming task cancels the request and frees its resources at once.
        """

    @abc.abstractmethod
    def load(self) -> EngineLoad:
        """A cheap snapshot for load reports."""

    @property
    @abc.abstractmethod
    def ready(self) -> bool:
        """True once start() finished and until stop()."""

    @property
    def max_context(self) -> int:
        """Prompt plus generated tokens allowed per sequence."""
        return 2048
