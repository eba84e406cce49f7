"""TensorRT-LLM adapter: the mapping functions everywhere, the real engine only where it can run."""

from __future__ import annotations

import importlib.util

import pytest

from services.modelserver.engine.base import (
    EngineUnavailableError,
    FinishReason,
    GenerationRequest,
    Priority,
    SamplingParams,
)
from services.modelserver.trtllm import TensorRTLLMEngine
from services.modelserver.trtllm.mapping import finish_reason, request_kwargs, sampling_kwargs


def test_greedy_maps_to_top_k_1():
    kw = sampling_kwargs(SamplingParams(max_tokens=10))
    assert kw["top_k"] == 1 and kw["max_tokens"] == 10 and kw["temperature"] == 0.0
    assert "seed" not in kw and "stop" not in kw and "logprobs" not in kw


def test_sampled_params_and_resume_budget():
    p = SamplingParams(max_tokens=20, temperature=0.7, top_p=0.9, top_k=0, seed=5, stop=("END",),
                       stop_token_ids=(2,), logprobs=True)
    kw = sampling_kwargs(p, resumed=4)
    assert kw == {"max_tokens": 16, "detokenize": True, "include_stop_str_in_output": False, "temperature": 0.7,
                  "top_p": 0.9, "seed": 5, "stop": ["END"], "stop_token_ids": [2], "logprobs": 1}
    assert sampling_kwargs(SamplingParams(temperature=1.0, top_k=40))["top_k"] == 40


def _req(priority: Priority) -> GenerationRequest:
    return GenerationRequest("r", "m", prompt="x", priority=priority)


def test_priority_only_when_supported():
    assert request_kwargs(_req(Priority.CRITICAL), ["inputs", "priority"]) == {"priority": 1.0}
    assert request_kwargs(_req(Priority.SHEDDABLE), {"priority"}) == {"priority": 0.0}
    assert request_kwargs(_req(Priority.STANDARD), {"priority"}) == {"priority": 0.5}
    assert request_kwargs(_req(Priority.CRITICAL), ["inputs", "sampling_params"]) == {}


def test_no_cache_salt_without_a_tenant():
    assert "cache_salt" not in request_kwargs(_req(Priority.STANDARD), {"cache_salt", "priority"})


def test_finish_reasons():
    assert finish_reason(None) is None
    assert finish_reason("stop") is FinishReason.STOP
    assert finish_reason("length") is FinishReason.LENGTH
    assert finish_reason("cancelled") is FinishReason.CANCELLED
    assert finish_reason("timeout") is FinishReason.CANCELLED  # ran out of time, like our deadlines
    assert finish_reason("weird") is FinishReason.ERROR


_HAS_TRT = importlib.util.find_spec("tensorrt_llm") is not None


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(_HAS_TRT, reason="tensorrt_llm is installed here")
def test_start_without_tensorrt_llm_says_why(run):
    engine = TensorRTLLMEngine("m", "/nonexistent")
    with pytest.raises(EngineUnavailableError, match="tensorrt_llm is not installed.*backend torch"):
        run(engine.start())
    assert not engine.ready


@pytest.mark.skipif(not (_HAS_TRT and _cuda()), reason="needs tensorrt_llm and a CUDA GPU (absent here)")
def test_real_tensorrt_llm_generates(run, tmp_path):  # pragma: no cover - GPU machines only
    import os

    path = os.environ.get("MESHSERVE_TRTLLM_MODEL")
    if not path:
        pytest.skip("set MESHSERVE_TRTLLM_MODEL to a local Hugging Face model folder")
    engine = TensorRTLLMEngine("m", path, max_context=1024)
    run(engine.start())
    try:
        async def go():
            req = GenerationRequest("r", "m", prompt="The capital of France is", sampling=SamplingParams(max_tokens=8))
            return [c async for c in engine.generate(req)]

        chunks = run(go())
        assert chunks[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert "".join(c.text for c in chunks)
    finally:
        run(engine.stop())


def test_options_for_other_backends_are_ignored_and_bad_values_refused():
    engine = TensorRTLLMEngine("m", "/models/x", threads=2, max_context=512, block_size=16)
    assert engine.config.max_context == 512 and engine.config.step_tokens == 512
    with pytest.raises(ValueError, match="power of two"):
        TensorRTLLMEngine("m", "/models/x", block_size=24)
    with pytest.raises(ValueError, match="not a model option"):
        TensorRTLLMEngine("m", "/models/x", api="fake")  # type: ignore[arg-type]
