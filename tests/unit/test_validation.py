import pytest
from meshserve.v1 import inference_pb2

from services.common.validation import MAX_INPUT_CHARS, validate_generate


def req(**kw):
    r = inference_pb2.GenerateRequest(model="m", prompt="hi")
    for k, v in kw.items():
        setattr(r, k, v)
    return r


def test_good_request_passes():
    validate_generate(req())
    r = inference_pb2.GenerateRequest(model="m")
    r.messages.add(role="system", content="be brief")
    r.messages.add(role="user", content="hi")
    validate_generate(r)


@pytest.mark.parametrize("change, message", [
    (dict(model=""), "model is required"),
    (dict(prompt=""), "empty"),
    (dict(prompt="x" * (MAX_INPUT_CHARS + 1)), "limit"),
    (dict(priority=9), "unknown priority"),
])
def test_shape_errors(change, message):
    with pytest.raises(ValueError, match=message):
        validate_generate(req(**change))


@pytest.mark.parametrize("field, value, message", [
    ("max_tokens", -1, "max_tokens must be >= 0"),
    ("max_tokens", 10**6, "max_tokens must be <="),
    ("temperature", -0.1, "temperature"),
    ("temperature", float("nan"), "temperature"),
    ("top_p", 1.01, "top_p"),
    ("top_p", -0.5, "top_p"),
    ("top_k", -3, "top_k"),
])
def test_sampling_errors(field, value, message):
    r = req()
    setattr(r.sampling, field, value)
    with pytest.raises(ValueError, match=message):
        validate_generate(r)


def test_message_errors():
    r = inference_pb2.GenerateRequest(model="m")
    r.messages.add(role="robot", content="x")
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        validate_generate(r)
    r = inference_pb2.GenerateRequest(model="m", prompt="p")
    r.messages.add(role="user", content="x")
    with pytest.raises(ValueError, match="not both"):
        validate_generate(r)
    r = req()
    r.sampling.stop.append("")
    with pytest.raises(ValueError, match="stop strings"):
        validate_generate(r)
