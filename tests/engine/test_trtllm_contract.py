"""The TensorRT-LLM surface we use, checked against the recorded contract of the pinned version,
and against the installed package where there is one."""

from __future__ import annotations

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest

from services.modelserver.engine.base import GenerationRequest, Priority, SamplingParams
from services.modelserver.trtllm.api import PINNED_VERSION, field_names
from services.modelserver.trtllm.config import TrtllmConfig, llm_kwargs
from services.modelserver.trtllm.contract import compare, installed_surface, recorded, recorded_names
from services.modelserver.trtllm.mapping import request_kwargs, sampling_kwargs
from tests.engine.trtllm_fake import FakeLLM, fake_api

REPO = Path(__file__).resolve().parents[2]

SAMPLINGS = [SamplingParams(max_tokens=10), SamplingParams(max_tokens=20, temperature=0.7, top_p=0.9, top_k=40,
                                                           seed=5, stop=("END",), stop_token_ids=(2,), logprobs=True)]


def test_record_is_for_the_pinned_version_and_pyproject_pins_it():
    assert recorded()["version"] == PINNED_VERSION
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"tensorrt-llm=={PINNED_VERSION}" in extras["tensorrt-llm"]


@pytest.mark.parametrize("p", SAMPLINGS)
def test_sampling_kwargs_use_recorded_names(p):
    assert set(sampling_kwargs(p)) <= recorded_names("SamplingParams")


def test_generate_async_kwargs_use_recorded_names():
    req = GenerationRequest("r", "m", prompt="x", priority=Priority.CRITICAL)
    req.tenant = "team-a"  # the tenancy hook (a GenerationRequest field since issue 14)
    kw = request_kwargs(req, recorded_names("generate_async"))
    assert kw == {"priority": 1.0, "cache_salt": "team-a"}
    assert {"inputs", "sampling_params", "streaming"} | set(kw) <= recorded_names("generate_async")


def test_llm_and_config_kwargs_use_recorded_names():
    kw = llm_kwargs(TrtllmConfig(), fake_api())
    assert set(kw) <= recorded_names("LlmArgs")
    assert set(vars(kw["kv_cache_config"])) <= recorded_names("KvCacheConfig")
    assert "waiting_queue_policy" in recorded_names("SchedulerConfig")


def test_the_fake_is_built_from_the_record():
    assert field_names(FakeLLM.generate_async) == recorded_names("generate_async")
    assert compare(installed_surface(fake_api()), PINNED_VERSION) == []


def test_compare_reports_missing_and_unrecorded_names():
    surface = installed_surface(fake_api())
    surface["generate_async"] = surface["generate_async"] - {"priority"} | {"new_arg"}
    problems = compare(surface, PINNED_VERSION)
    assert any(re.search(r"generate_async: .* lacks \['priority'\]", p) for p in problems)
    assert any("new_arg" in p for p in problems)
    assert not any("new_arg" in p for p in compare(surface, "9.9.9"))  # other versions: containment only


@pytest.mark.skipif(importlib.util.find_spec("tensorrt_llm") is None, reason="tensorrt_llm is not installed here")
def test_installed_tensorrt_llm_matches_the_record():  # pragma: no cover - GPU machines only
    from services.modelserver.trtllm.api import import_api

    api = import_api()
    assert compare(installed_surface(api), api.version) == []
