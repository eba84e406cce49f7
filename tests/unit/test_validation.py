"""One validation for every generate request: limits, messages, resolved defaults, and the
hostile inputs tests found (inf temperature, 1 MB ids, model names '..' and ' ')."""

import math

import pytest
from meshserve.v1 import common_pb2, inference_pb2, modelserver_pb2

from services.common.errors import InvalidArgument
from services.common.validation import (
    DEFAULT_MAX_TOKENS,
    MAX_INPUT_CHARS,
    Priority,
    SamplingParams,
    ValidRequest,
    validate_request,
)
from services.modelserver.engine.base import GenerationRequest


def req(**kw):
    r = inference_pb2.GenerateRequest(model="m", prompt="hi")
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_good_requests_come_out_typed_with_defaults_resolved():
    v = validate_request(req())
    assert v == ValidRequest(model="m", prompt="hi")
    assert v.sampling.max_tokens == DEFAULT_MAX_TOKENS and v.sampling.top_p == 1.0
    assert v.priority is Priority.STANDARD and v.sampling.seed is None
    r = inference_pb2.GenerateRequest(model="m", session_id="s-1", region="eu-west", request_id="abc")
    r.messages.add(role="system", content="be brief")
    r.messages.add(role="user", content="hi")
    r.sampling.seed = 0
    r.resume_token_ids.extend([5, 6])
    v = validate_request(r)
    assert v.prompt is None and [m.role for m in v.messages or ()] == ["system", "user"]
    assert v.sampling.seed == 0 and v.resume_token_ids == (5, 6) and v.session_id == "s-1"
    internal = modelserver_pb2.ModelServerServiceGenerateRequest(model="m", prompt="p",
                                                                 priority=common_pb2.PRIORITY_CRITICAL)
    assert validate_request(internal).priority is Priority.CRITICAL


@pytest.mark.parametrize("change, message", [
    (dict(model=""), "model is required"),
    (dict(model=".."), "not a valid model name"),
    (dict(model=" "), "not a valid model name"),
    (dict(model="a" * 129), "not a valid model name"),
    (dict(prompt=""), "empty"),
    (dict(prompt="x" * (MAX_INPUT_CHARS + 1)), "limit"),
    (dict(priority=9), "unknown priority"),
    (dict(request_id="r" * 1_000_000), "request_id is 1000000 characters"),
    (dict(session_id="s" * 1_000_000), "session_id is 1000000 characters"),
    (dict(session_id="a\nb"), "printable ASCII"),
    (dict(region="../etc"), "not a region name"),
])
def test_shape_errors(change, message):
    with pytest.raises(InvalidArgument, match=message):
        validate_request(req(**change))


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", -1, "max_tokens must be >= 0"),
    ("max_tokens", 10**6, r"max_tokens must be in \[1, 65536\]"),
    ("temperature", -0.1, "temperature"),
    ("temperature", math.nan, "temperature"),
    ("temperature", math.inf, "temperature"),
    ("temperature", 1e9, "temperature"),
    ("top_p", 1.01, "top_p"),
    ("top_p", -0.5, "top_p"),
    ("top_p", math.nan, "top_p"),
    ("top_k", -3, "top_k"),
])
def test_sampling_errors(field, value, message):
    r = req()
    setattr(r.sampling, field, value)
    with pytest.raises(InvalidArgument, match=message):
        validate_request(r)


def test_message_stop_and_resume_errors():
    r = inference_pb2.GenerateRequest(model="m")
    r.messages.add(role="robot", content="x")
    with pytest.raises(InvalidArgument, match=r"messages\[0\].role"):
        validate_request(r)
    r = inference_pb2.GenerateRequest(model="m", prompt="p")
    r.messages.add(role="user", content="x")
    with pytest.raises(InvalidArgument, match="not both"):
        validate_request(r)
    for stops, message in (([""], r"stop\[0\]"), (["x" * 300], r"stop\[0\]"), (["a"] * 17, "at most 16")):
        r = req()
        r.sampling.stop.extend(stops)
        with pytest.raises(InvalidArgument, match=message):
            validate_request(r)
    r = req()
    r.sampling.max_tokens = 2
    r.resume_token_ids.extend([1, 2])
    with pytest.raises(InvalidArgument, match="already reach max_tokens"):
        validate_request(r)
    r = req()
    r.resume_token_ids.append(-4)
    with pytest.raises(InvalidArgument, match="resume_token_ids must be token ids"):
        validate_request(r)


def test_value_types_check_themselves_so_no_unchecked_request_exists():
    with pytest.raises(InvalidArgument, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidArgument, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(InvalidArgument, match="empty"):
        GenerationRequest("r", "m")
    with pytest.raises(InvalidArgument):
        ValidRequest(model="m", prompt="p", request_id="x\x00y")
