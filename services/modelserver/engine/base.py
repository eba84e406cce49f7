"""The engine interface every backend implements (sim, torch, tensorrt_llm).

Plain Python on purpose: the gRPC servicer converts protobuf to these types at the boundary,
so engines are testable without gRPC and the server never knows which backend it runs.
"""

from __future__ import annotations

import abc
import enum
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field


class Priority(enum.IntEnum):
    """Lower value is more important; matches meshserve.v1.Priority numbering."""

    CRITICAL = 1
    STANDARD = 2
    SHEDDABLE = 3


class FinishReason(enum.Enum):
    LENGTH = "length"
    STOP = "stop"
    CANCELLED = "cancelled"
    ERROR = "error"


class InvalidRequestError(ValueError):
    """The request can never succeed as written (maps to INVALID_ARGUMENT)."""


class CapacityError(RuntimeError):
    """The engine cannot take the request now (maps to RESOURCE_EXHAUSTED)."""


class EngineUnavailableError(RuntimeError):
    """The engine is not loaded, is stopping, or failed (maps to UNAVAILABLE)."""


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = disabled
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    logprobs: bool = False

    def validate(self) -> None:
        """Range checks shared by every backend; backends add context-length checks."""
        if self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequestError(f"top_k must be >= 0, got {self.top_k}")
        if any(s == "" for s in self.stop):
            raise InvalidRequestError("stop strings must not be empty")
        if len(self.stop) > 16:
            raise InvalidRequestError(f"at most 16 stop strings, got {len(self.stop)}")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


@dataclass
class GenerationRequest:
    request_id: str
    model: str
    prompt: str | None = None
    messages: Sequence[ChatMessage] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: Priority = Priority.STANDARD
    # Tokens already produced elsewhere (mid-stream migration); generation continues after them
    # and they count against max_tokens.
    resume_token_ids: Sequence[int] = ()
    # time.monotonic() value after which the request is cancelled; None = no deadline.
    deadline: float | None = None

    def validate_shape(self) -> None:
        """Checks that do not need a tokenizer."""
        has_prompt = bool(self.prompt)
        has_messages = bool(self.messages)
        if has_prompt == has_messages:
            raise InvalidRequestError("give exactly one of prompt or messages (both empty or both set)")
        if has_messages:
            for i, m in enumerate(self.messages or ()):
                if m.role not in ("system", "user", "assistant"):
                    raise InvalidRequestError(
                        f"messages[{i}].role must be system, user or assistant, got {m.role!r}")
        self.sampling.validate()
        if len(self.resume_token_ids) >= self.sampling.max_tokens:
            raise InvalidRequestError("resume_token_ids already reach max_tokens")


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
