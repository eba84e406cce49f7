"""The engine option schema: it cannot drift from the config classes, and it refuses what would
crash an engine (an empty key, tokens_per_second=0, NaN) with the option's name."""

from __future__ import annotations

import dataclasses
import math

import pytest

from services.common.errors import InvalidArgument
from services.modelserver.engine import ModelSpec, create_engine
from services.modelserver.engine import options as schema
from services.modelserver.engine.sim import SimConfig
from services.modelserver.trtllm.config import TrtllmConfig
from services.modelserver.trtllm.engine import TensorRTLLMEngine


def _dataclass_view(cls) -> dict[str, tuple[str, object]]:
    return {f.name: (str(f.type), f.default) for f in dataclasses.fields(cls)}


def _schema_view(backend: str) -> dict[str, tuple[str, object]]:
    return {o.name: (o.kind.__name__, o.default) for o in schema.SCHEMAS[backend]}


def test_schema_matches_sim_config():
    assert _schema_view("sim") == _dataclass_view(SimConfig)


def test_schema_matches_torch_engine_config():
    torch_config = pytest.importorskip("services.modelserver.torch_engine.config")
    assert _schema_view("torch") == _dataclass_view(torch_config.TorchEngineConfig)


def test_schema_matches_tensorrt_llm_config():
    assert _schema_view("tensorrt_llm") == _dataclass_view(TrtllmConfig)


def test_every_default_passes_its_own_checks():
    for backend in schema.BACKENDS:
        schema.check_values(backend, schema.defaults(backend))
        assert schema.validate_options(backend, schema.as_text(schema.defaults(backend)),
                                       allow_server_only=True) == schema.defaults(backend)


@pytest.mark.parametrize("backend, options, words", [
    ("sim", {"": "x"}, "empty name"),
    ("sim", {"  ": "x"}, "empty name"),
    ("sim", {"tokens_per_second": "0"}, "tokens_per_second=0"),
    ("sim", {"tokens_per_second": "-5"}, "> 0"),
    ("sim", {"tokens_per_second": "nan"}, "finite"),
    ("sim", {"first_token_latency_s": "inf"}, "finite"),
    ("sim", {"max_running": "1.5"}, "an integer"),
    ("sim", {"max_running": "0"}, ">= 1"),
    ("sim", {"no_such_option": "1"}, "knows: tokens_per_second"),
    ("sim", {"threads": "2"}, "unknown engine option 'threads' for backend sim"),
    ("sim", {"hang_file": "/tmp/x"}, "command line"),
    ("torch", {"dtype": "float16"}, "one of auto, float32, bfloat16"),
    ("torch", {"warmup": "maybe"}, "true or false"),
    ("torch", {"kv_cache_blocks": "0", "kv_cache_bytes": "0"}, "both 0"),
    ("torch", {"max_running": "2", "max-running": "3"}, "twice"),
    ("tensorrt_llm", {"kv_cache_fraction": "1.5"}, "<= 1"),
    ("cobol", {}, "unknown backend 'cobol'"),
])
def test_bad_options_are_refused_with_their_name(backend, options, words):
    with pytest.raises(InvalidArgument) as info:
        schema.validate_options(backend, options)
    assert words in info.value.message


def test_values_are_typed_and_names_normalised():
    typed = schema.validate_options("torch", {"max-running": "8", "warmup": "off", "dtype": "float32"})
    assert typed == {"max_running": 8, "warmup": False, "dtype": "float32"}
    assert schema.validate_options("sim", {"tokens_per_second": 500}) == {"tokens_per_second": 500.0}
    assert schema.validate_options("sim", {"hang_file": "/tmp/h"}, allow_server_only=True)
    assert schema.as_text({"warmup": True, "threads": 2}) == {"warmup": "true", "threads": "2"}


def test_config_classes_refuse_values_that_would_crash_the_engine():
    with pytest.raises(InvalidArgument, match="tokens_per_second"):
        SimConfig(tokens_per_second=0)
    with pytest.raises(InvalidArgument, match="prefill_tokens_per_second"):
        SimConfig(prefill_tokens_per_second=math.inf)
    with pytest.raises(InvalidArgument, match="kv_cache_fraction"):
        TensorRTLLMEngine("m", "path", kv_cache_fraction=0.0)
    torch_config = pytest.importorskip("services.modelserver.torch_engine.config")
    with pytest.raises(InvalidArgument, match="max_context"):
        torch_config.TorchEngineConfig(max_context=-1).validate()


def test_create_engine_checks_options_before_building_anything():
    with pytest.raises(InvalidArgument, match="empty name"):
        create_engine(ModelSpec("x", "sim", options={"": "x"}))
    engine = create_engine(ModelSpec("x", "sim", options={"tokens_per_second": "50"}))
    assert engine.config.tokens_per_second == 50.0  # type: ignore[attr-defined]


def test_describe_lists_every_option_with_what_is_allowed():
    text = schema.describe("sim")
    assert all(o.name in text for o in schema.SIM)
    assert "tokens_per_second: a finite number > 0 and <= 1e+06" in text
