"""The engine options each backend knows: name, type, allowed values, default and a line of help.

Options arrive as text (`--engine-option k=v` on a server, `meshctl model deploy --option k=v`,
`ModelSpec.options` in etcd). The control plane checks a deployment against this schema before it
writes it, and the model server checks again before it builds an engine, so a bad value is
refused with its name and what is allowed instead of ending deep inside an engine (an empty key,
`tokens_per_second=0` dividing by zero).

Light on purpose: neither torch nor tensorrt_llm is imported here, so the control plane and
meshctl can use it. tests/unit/test_engine_options.py keeps it and the config classes in step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from services.common.errors import InvalidArgument

MAX_OPTIONS = 64
MAX_KEY_CHARS = 64
MAX_VALUE_CHARS = 1024
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class Option:
    name: str
    kind: type  # int, float, bool or str
    default: object
    help: str
    low: float | None = None  # inclusive
    high: float | None = None  # inclusive
    positive: bool = False  # strictly above 0 (a rate or a fraction that divides)
    choices: tuple[str, ...] = ()
    #: Only a server's own --engine-option may set it (fault injection, host paths), never a
    #: deployment: the control plane must not make a server touch its filesystem.
    server_only: bool = False

    def allowed(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind is bool:
            return "true or false"
        if self.kind is str:
            return "a string"
        kind = "an integer" if self.kind is int else "a finite number"

        def show(bound: float) -> str:
            return str(int(bound)) if self.kind is int else f"{bound:g}"
        lo = "> 0" if self.positive else (f">= {show(self.low)}" if self.low is not None else "")
        hi = f"<= {show(self.high)}" if self.high is not None else ""
        return kind + (" " + " and ".join(p for p in (lo, hi) if p) if lo or hi else "")

    def parse(self, raw: str) -> object:
        """Text to a typed value, range-checked."""
        text = raw.strip()
        value: object
        try:
            if self.kind is bool:
                if text.lower() not in _TRUE + _FALSE:
                    raise ValueError
                value = text.lower() in _TRUE
            elif self.kind is int:
                value = int(text, 10)
            elif self.kind is float:
                value = float(text)
            else:
                value = raw
        except ValueError:
            raise self.refuse(raw) from None
        try:
            self.check(value)
        except InvalidArgument:
            raise self.refuse(raw) from None  # name the value as the operator wrote it
        return value

    def check(self, value: object) -> None:
        """A typed value within range (the config classes call this too)."""
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not self.kind:
            raise self.refuse(value)
        if self.choices and value not in self.choices:
            raise self.refuse(value)
        if self.kind in (int, float):
            number = float(value)  # type: ignore[arg-type]
            if (not math.isfinite(number) or (self.positive and number <= 0)
                    or (self.low is not None and number < self.low)
                    or (self.high is not None and number > self.high)):
                raise self.refuse(value)
        if isinstance(value, str) and not value.isprintable():
            raise InvalidArgument(f"engine option {self.name}: the value must be printable text")

    def refuse(self, value: object) -> InvalidArgument:
        if isinstance(value, str):
            plain = value.isprintable() and value.strip() == value != ""
            shown = value if plain else repr(value)
        else:
            shown = str(value)
        return InvalidArgument(f"engine option {self.name}={shown[:80]} is not allowed: it must be "
                               f"{self.allowed()} ({self.help})")


def _opt(name: str, kind: type, default: object, help: str, **kw: object) -> Option:
    return Option(name, kind, default, help, **kw)  # type: ignore[arg-type]


SIM = (
    _opt("tokens_per_second", float, 200.0, "decode speed per sequence", positive=True, high=1e6),
    _opt("first_token_latency_s", float, 0.01, "fixed delay before the first token", low=0, high=600),
    _opt("prefill_tokens_per_second", float, 20_000.0, "prompt processing speed", positive=True,
         high=1e9),
    _opt("max_running", int, 32, "sequences decoded at once", low=1, high=100_000),
    _opt("max_waiting", int, 512, "requests queued before CapacityError", low=0, high=10_000_000),
    _opt("block_size", int, 16, "tokens per simulated KV block", low=1, high=1024),
    _opt("kv_blocks_total", int, 4096, "simulated KV blocks", low=1, high=1 << 30),
    _opt("max_context", int, 2048, "prompt + output tokens per request", low=1, high=1 << 24),
    _opt("hang_file", str, "", "fault injection: generation hangs while this file exists",
         server_only=True),
    _opt("load_s", float, 0.0, "seconds the engine takes to load (a model being placed stays LOADING)",
         low=0, high=3600),
    _opt("error_rate", float, 0.0, "fault injection: this share of requests fails UNAVAILABLE before "
         "the first token", low=0, high=1),
    _opt("error_after_s", float, 0.0, "fault injection: error_rate applies from this many seconds "
         "after the engine started", low=0, high=1e6),
)
TORCH = (
    _opt("dtype", str, "auto", "weights and activations; auto = bf16 where the CPU computes it natively",
         choices=("auto", "float32", "bfloat16")),
    _opt("threads", int, 0, "torch intra-op threads (0 = torch's default)", low=0, high=1024),
    _opt("block_size", int, 64, "tokens per KV cache page (the C++ kernel takes 16, 32, 64 or 128)", low=1,
         high=1024),
    _opt("kv_cache_blocks", int, 0, "KV pool in blocks (0 = from kv_cache_bytes)", low=0,
         high=1 << 30),
    _opt("kv_cache_bytes", int, 512 * 1024 * 1024, "KV pool in bytes when kv_cache_blocks is 0",
         low=0, high=1 << 46),
    _opt("kv_cache_dtype", str, "auto", "KV cache elements: auto = the model's dtype; int8 = int8 with a scale "
         "per token and head (~3.8x fewer bytes than float32; changes answers slightly)", choices=("auto", "int8")),
    _opt("max_running", int, 64, "sequences in one step", low=1, high=1 << 16),
    _opt("step_token_budget", int, 512, "tokens computed per step", low=1, high=1 << 20),
    _opt("max_context", int, 4096, "prompt + output tokens (0 = the model's own limit)", low=0,
         high=1 << 24),
    _opt("max_waiting", int, 1024, "requests queued before CapacityError", low=1, high=1 << 24),
    _opt("int8_max_tokens", int, 0, "steps up to this many tokens use int8 weights (0 = never; changes answers)",
         low=0, high=1 << 20),
    _opt("batch_invariant", bool, False, "greedy output independent of batching, chunking and cache state"),
    _opt("invariant_rows", int, 16, "GEMM block rows in batch-invariant mode", low=1, high=4096),
    _opt("pause_chunks", int, 64, "unread chunks at which a request pauses (backpressure)", low=1,
         high=1 << 20),
    _opt("resume_chunks", int, 16, "unread chunks below which a paused request resumes", low=1,
         high=1 << 20),
    _opt("warmup", bool, True, "run a short generation at start"),
    _opt("shared_kv", bool, True, "write full KV blocks to the server's shared store and fetch them on a "
         "local prefix miss (needs --cache-store)"),
)
TENSORRT_LLM = (
    _opt("max_context", int, 4096, "prompt + output tokens (max_seq_len)", low=1, high=1 << 24),
    _opt("max_running", int, 64, "sequences in one batch (max_batch_size)", low=1, high=1 << 16),
    _opt("max_num_tokens", int, 0, "tokens per iteration, decode plus prefill chunks (0 = min(2048, "
         "max_context))", low=0, high=1 << 24),
    _opt("kv_cache_fraction", float, 0.85, "share of free GPU memory for the KV cache",
         positive=True, high=1.0),
    _opt("block_size", int, 16, "tokens per KV block (a power of two)", low=2, high=1024),
    _opt("enable_chunked_prefill", bool, True, "split long prompts across iterations"),
    _opt("priority_queue", bool, True, "order the waiting queue by request priority"),
    _opt("kv_event_buffer", int, 4096, "KV-cache events kept until read (0 = no events)", low=0,
         high=1 << 24),
    _opt("poll_timeout_s", float, 2.0, "wait of one stats / KV-event read", positive=True, high=60),
    _opt("stats_stale_s", float, 2.0, "stats older than this no longer describe the load", positive=True,
         high=600),
)

def _trt_tokens(values: Mapping[str, object]) -> str:
    max_num, context = values.get("max_num_tokens", 0), values.get("max_context", 4096)
    if isinstance(max_num, int) and isinstance(context, int) and max_num > context:
        return f"max_num_tokens ({max_num}) is above max_context ({context})"
    block = values.get("block_size", 16)
    if isinstance(block, int) and block & (block - 1):
        return f"block_size must be a power of two, got {block}"
    return ""


SCHEMAS: dict[str, tuple[Option, ...]] = {"sim": SIM, "torch": TORCH, "tensorrt_llm": TENSORRT_LLM}
#: Engine backends a model can run on (`create_engine` builds each).
BACKENDS: tuple[str, ...] = tuple(SCHEMAS)


def _torch_pool(values: Mapping[str, object]) -> str:
    if values.get("kv_cache_blocks", 0) == 0 and values.get("kv_cache_bytes", 1) == 0:
        return "kv_cache_blocks and kv_cache_bytes are both 0: give one of them"
    return ""


def _torch_modes(values: Mapping[str, object]) -> str:
    pause, resume = values.get("pause_chunks", 64), values.get("resume_chunks", 16)
    if isinstance(pause, int) and isinstance(resume, int) and resume >= pause:
        return f"resume_chunks ({resume}) must be below pause_chunks ({pause})"
    if values.get("batch_invariant"):
        if values.get("block_size", 64) not in (16, 32, 64, 128):
            return f"batch_invariant needs block_size 16, 32, 64 or 128, got {values.get('block_size')}"
        if values.get("int8_max_tokens", 0):
            return "batch_invariant excludes the int8 path (int8_max_tokens must be 0)"
    return ""


#: Rules across options, per backend: '' when fine, else the problem.
CROSS_CHECKS: dict[str, tuple[Callable[[Mapping[str, object]], str], ...]] = {
    "torch": (_torch_pool, _torch_modes), "tensorrt_llm": (_trt_tokens,)}


def check_backend(backend: str) -> tuple[Option, ...]:
    schema = SCHEMAS.get(backend)
    if schema is None:
        shown = repr(backend)[:40]
        raise InvalidArgument(f"unknown backend {shown}; choose one of {', '.join(BACKENDS)}")
    return schema


def known(backend: str, key: str) -> bool:
    return any(o.name == key for o in SCHEMAS.get(backend, ()))


def _canonical_key(key: str) -> str:
    return key.strip().replace("-", "_")


def validate_options(backend: str, options: Mapping[str, object], *,
                     allow_server_only: bool = False) -> dict[str, object]:
    """A {name: text} map (typed values are accepted too) -> {name: typed value}, or
    InvalidArgument naming the first bad option and what is allowed."""
    schema = {o.name: o for o in check_backend(backend)}
    names = ", ".join(schema)
    if len(options) > MAX_OPTIONS:
        raise InvalidArgument(f"{len(options)} engine options; at most {MAX_OPTIONS}")
    typed: dict[str, object] = {}
    for key, raw in options.items():
        name = _canonical_key(str(key))
        if not name:
            raise InvalidArgument(f"an engine option has an empty name; backend {backend} knows: "
                                  f"{names}")
        option = schema.get(name)
        if option is None:
            raise InvalidArgument(f"unknown engine option {str(key)[:MAX_KEY_CHARS]!r} for backend "
                                  f"{backend}; it knows: {names}")
        if option.server_only and not allow_server_only:
            raise InvalidArgument(f"engine option {name} can only be set on a model server's own "
                                  "command line (--engine-option), not in a deployment")
        if name in typed:
            raise InvalidArgument(f"engine option {name} is given twice")
        text = str(raw).lower() if isinstance(raw, bool) else str(raw)
        if len(text) > MAX_VALUE_CHARS:
            raise InvalidArgument(f"engine option {name}: the value is longer than "
                                  f"{MAX_VALUE_CHARS} characters")
        typed[name] = option.parse(text)
    check_values(backend, {**defaults(backend), **typed})
    return typed


def check_values(backend: str, values: Mapping[str, object]) -> None:
    """Range and cross-option checks on typed values (what the config classes validate)."""
    schema = {o.name: o for o in check_backend(backend)}
    for name, value in values.items():
        if name in schema:
            schema[name].check(value)
    for rule in CROSS_CHECKS.get(backend, ()):
        problem = rule(values)
        if problem:
            raise InvalidArgument(f"engine options of backend {backend}: {problem}")


def defaults(backend: str) -> dict[str, object]:
    return {o.name: o.default for o in check_backend(backend)}


def as_text(values: Mapping[str, object]) -> dict[str, str]:
    """Typed values back to the text stored in a ModelSpec (booleans as true/false)."""
    return {k: (str(v).lower() if isinstance(v, bool) else str(v)) for k, v in values.items()}


def describe(backend: str) -> str:
    """One line per option, for --help texts and error messages."""
    lines = []
    for o in check_backend(backend):
        default = as_text({o.name: o.default})[o.name] or "''"
        only = " (server command line only)" if o.server_only else ""
        lines.append(f"  {o.name}: {o.allowed()}; default {default}. {o.help}{only}")
    return "\n".join(lines)
