"""KServe v2 tensors <-> MeshServe requests: the plain functions behind the router's
GRPCInferenceService, plus the wire contract of our grpc_service.proto against tritonclient's."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys

import pytest
from inference import grpc_service_pb2 as kserve_pb2
from meshserve.v1 import common_pb2
from meshserve.v1 import inference_pb2 as meshserve_pb2

from services.common.errors import InvalidArgument
from services.common.validation import validate_request
from services.router.convert import merge_chunks
from services.router.kserve import mapping, tensors
from services.router.kserve.mapping import InvalidInput, UnknownVersion

RAW_FORMATS = {"INT32": "i", "UINT64": "Q", "FP32": "f", "BOOL": "?"}


def request(*inputs: tuple, raw: bool = True, model: str = "echo", **kw
            ) -> kserve_pb2.ModelInferRequest:
    """inputs: (name, datatype, shape, values); raw=True encodes them as tritonclient does."""
    req = kserve_pb2.ModelInferRequest(model_name=model, **kw)
    for name, datatype, shape, values in inputs:
        t = req.inputs.add(name=name, datatype=datatype, shape=shape)
        if raw:
            if datatype == "BYTES":
                req.raw_input_contents.append(tensors.encode_bytes_elements(values))
            else:
                fmt = RAW_FORMATS[datatype]
                req.raw_input_contents.append(struct.pack(f"<{len(values)}{fmt}", *values))
        else:
            field = {"BYTES": "bytes_contents", "INT32": "int_contents", "BOOL": "bool_contents",
                     "FP32": "fp32_contents", "UINT64": "uint64_contents"}[datatype]
            getattr(t.contents, field).extend(values)
    return req


def text(prompt: bytes = b"hello world", shape=(1, 1)) -> tuple:
    return ("text_input", "BYTES", list(shape), [prompt])


def one(name: str, datatype: str, value) -> tuple:
    return (name, datatype, [1, 1], [value])


# --- tensor encodings --------------------------------------------------------------------------

def test_bytes_elements_round_trip():
    items = [b"", b"a", "héllo".encode(), b"\x00\xff" * 100]
    raw = tensors.encode_bytes_elements(items)
    assert raw[:4] == b"\x00\x00\x00\x00" and raw[4:8] == b"\x01\x00\x00\x00"
    assert tensors.decode_bytes_elements("x", raw) == items
    assert tensors.decode_bytes_elements("x", b"") == []


@pytest.mark.parametrize("raw, words", [
    (b"\x05\x00", "inside a length prefix"),
    (b"\x05\x00\x00\x00abc", "truncated"),
    (b"\x01\x00\x00\x00a\x02", "inside a length prefix"),
])
def test_bad_raw_bytes_are_explained(raw, words):
    with pytest.raises(tensors.TensorError, match=words):
        tensors.decode_bytes_elements("text_input", raw)


def test_encode_raw_numbers_little_endian():
    assert tensors.encode_raw("FP32", [1.0, -0.5]) == struct.pack("<2f", 1.0, -0.5)
    assert tensors.encode_raw("INT32", [1]) == b"\x01\x00\x00\x00"


# --- requests ----------------------------------------------------------------------------------

@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_full_request_maps_to_generate(raw):
    req = request(text(b"alpha beta"), one("max_tokens", "INT32", 7), one("stream", "BOOL", True),
                  one("temperature", "FP32", 0.5), one("top_p", "FP32", 0.25),
                  one("top_k", "INT32", 40), one("random_seed", "UINT64", 2**63 + 5),
                  ("stop_words", "BYTES", [1, 2], [b"END", b"STOP"]),
                  one("return_log_probs", "BOOL", True), one("beam_width", "INT32", 1),
                  one("exclude_input_in_output", "BOOL", True), raw=raw, id="req-9")
    call = mapping.to_generate(req)
    g = call.generate
    assert (g.model, g.prompt, g.request_id) == ("echo", "alpha beta", "req-9")
    s = g.sampling
    assert (s.max_tokens, s.temperature, s.top_p, s.top_k) == (7, 0.5, 0.25, 40)
    assert s.HasField("seed") and s.seed == 2**63 + 5
    assert list(s.stop) == ["END", "STOP"] and s.logprobs
    assert call.stream and call.batched and call.request_id == "req-9"
    assert call.outputs == ("text_output", "output_log_probs")
    assert not call.empty_final


def test_minimal_request_uses_defaults():
    call = mapping.to_generate(request(text(b"hi", shape=[1])))
    s = call.generate.sampling
    assert call.generate.prompt == "hi"
    assert (s.max_tokens, s.temperature, s.top_k, s.logprobs, s.HasField("seed")) == (
        0, 0.0, 0, False, False)
    assert not call.stream and not call.batched and call.outputs == ("text_output",)


def test_empty_stop_words_are_dropped():
    call = mapping.to_generate(request(text(), ("stop_words", "BYTES", [1, 2], [b"", b"x"])))
    assert list(call.generate.sampling.stop) == ["x"]


def test_requested_outputs_and_empty_final_parameter():
    req = request(text())
    req.outputs.add(name="output_log_probs")
    req.outputs.add(name="text_output")
    req.outputs.add(name="output_log_probs")
    req.parameters[mapping.EMPTY_FINAL_PARAM].bool_param = True
    call = mapping.to_generate(req)
    assert call.outputs == ("output_log_probs", "text_output")
    assert call.generate.sampling.logprobs  # asking for the tensor turns log-probs on
    assert call.empty_final


@pytest.mark.parametrize("build, words", [
    (lambda: request(one("max_tokens", "INT32", 4)), "'text_input' (BYTES"),
    (lambda: request(("text_input", "INT32", [1], [3])), "must be BYTES, got datatype 'INT32'"),
    (lambda: _with_datatype(request(text(), one("max_tokens", "INT32", 4)), 1, "INT64"),
     "'max_tokens' must be INT32"),
    (lambda: request(text(shape=[2])), "shape [1] or [1, 1]"),
    (lambda: request(("text_input", "BYTES", [2, 1], [b"a", b"b"])), "batch size 1"),
    (lambda: request(("stop_words", "BYTES", [2, 1], [b"a", b"b"]), text()), "'stop_words'"),
    (lambda: request(text(b"")), "'text_input' is empty"),
    (lambda: request(text(b"\xff\xfe")), "not valid UTF-8"),
    (lambda: request(text(), one("beam_width", "INT32", 4)), "'beam_width' must be 1"),
    (lambda: request(text(), one("exclude_input_in_output", "BOOL", False)), "must be true"),
    (lambda: request(text(), one("end_id", "INT32", 2)), "unexpected input 'end_id'"),
    (lambda: request(text(), text()), "more than once"),
    (lambda: request(text(), model=""), "model_name is required"),
    (lambda: _requesting(request(text()), "logits"), "unexpected requested output 'logits'"),
])
def test_bad_requests_are_explained(build, words):
    with pytest.raises(InvalidInput) as info:
        mapping.to_generate(build())
    assert words in str(info.value)


@pytest.mark.parametrize("build, words", [
    (lambda: request(text(), one("max_tokens", "INT32", -1)), "max_tokens must be >= 0"),
    (lambda: request(text(), one("temperature", "FP32", -1.0)), "temperature must be a number in [0, 100]"),
    (lambda: request(text(), one("temperature", "FP32", math.nan)), "temperature"),
    (lambda: request(text(), one("temperature", "FP32", math.inf)), "temperature"),
    (lambda: request(text(), one("top_p", "FP32", 1.5)), "top_p must be in (0, 1]"),
    (lambda: request(text(), one("top_k", "INT32", -3)), "top_k must be in [0, "),
    (lambda: request(text(), id="x" * 300), "request_id is 300 characters"),
])
def test_value_ranges_are_checked_by_the_one_validation_with_the_tensor_names(build, words):
    """The servicer validates what mapping translated, with every other API's limits."""
    with pytest.raises(InvalidArgument) as info:
        validate_request(mapping.to_generate(build()).generate)
    assert words in str(info.value)


def _with_datatype(req, index, datatype):
    req.inputs[index].datatype = datatype
    return req


def _requesting(req, name):
    req.outputs.add(name=name)
    return req


def test_bad_raw_contents_are_explained():
    req = request(text(), one("max_tokens", "INT32", 4))
    req.raw_input_contents[1] = b"\x01\x00"
    with pytest.raises(InvalidInput, match=r"has 2 bytes; INT32 with shape \[1, 1\] needs 4"):
        mapping.to_generate(req)
    req = request(text(), one("max_tokens", "INT32", 4))
    del req.raw_input_contents[1]
    with pytest.raises(InvalidInput, match="1 entries for 2 inputs"):
        mapping.to_generate(req)
    req = request(text())
    req.raw_input_contents[0] = b"\x03\x00\x00\x00ab"
    with pytest.raises(InvalidInput, match="truncated"):
        mapping.to_generate(req)
    req = request(text())
    req.inputs[0].contents.bytes_contents.append(b"also typed")
    with pytest.raises(InvalidInput, match="both contents and raw_input_contents"):
        mapping.to_generate(req)


def test_typed_contents_in_the_wrong_list_are_explained():
    req = request(text(), raw=False)
    req.inputs.add(name="max_tokens", datatype="INT32", shape=[1]).contents.int64_contents.append(3)
    with pytest.raises(InvalidInput, match=r"has 0 element\(s\).*contents.int_contents"):
        mapping.to_generate(req)


def test_unknown_version_is_not_found():
    with pytest.raises(UnknownVersion, match="no version '2'"):
        mapping.to_generate(request(text(), model_version="2"))
    assert mapping.to_generate(request(text(), model_version="1")).generate.prompt


# --- responses ---------------------------------------------------------------------------------

def chunk(text: str, finish: common_pb2.FinishReason = common_pb2.FINISH_REASON_UNSPECIFIED, logprobs=(),
          usage=None) -> meshserve_pb2.GenerateResponse:
    out = meshserve_pb2.GenerateResponse(text=text, logprobs=logprobs, finish_reason=finish,
                                         request_id="rid")
    out.served_by.server_id, out.served_by.simulated, out.served_by.backend = "s0", True, "sim"
    if usage:
        out.usage.prompt_tokens, out.usage.completion_tokens = usage
    return out


def test_response_holds_text_output_as_raw_bytes_tensor():
    call = mapping.to_generate(request(text(), id="q1"))
    resp = mapping.to_infer_response(call, chunk("héllo", common_pb2.FINISH_REASON_LENGTH,
                                                 usage=(2, 3)))
    assert (resp.model_name, resp.model_version, resp.id) == ("echo", "1", "q1")
    [out] = resp.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("text_output", "BYTES", [1, 1])
    assert tensors.decode_bytes_elements("t", resp.raw_output_contents[0]) == ["héllo".encode()]
    p = resp.parameters
    assert p["meshserve_simulated"].bool_param and p["meshserve_server_id"].string_param == "s0"
    assert p["meshserve_finish_reason"].string_param == "length"
    assert p["meshserve_completion_tokens"].int64_param == 3
    assert mapping.FINAL_PARAM not in p  # unary responses carry no stream marker


def test_streamed_response_carries_final_flag_and_log_probs():
    call = mapping.to_generate(request(text(shape=[1]), one("return_log_probs", "BOOL", True)))
    resp = mapping.to_infer_response(call, chunk(" a", logprobs=[-0.5, -1.0]), final=False)
    assert [(o.name, list(o.shape)) for o in resp.outputs] == [
        ("text_output", [1]), ("output_log_probs", [1, 2])]
    assert struct.unpack("<2f", resp.raw_output_contents[1]) == (-0.5, -1.0)
    assert resp.parameters[mapping.FINAL_PARAM].bool_param is False
    marker = mapping.final_marker(call)
    assert not marker.outputs and marker.parameters[mapping.FINAL_PARAM].bool_param


def test_merge_chunks_joins_text_and_keeps_the_ending():
    merged = merge_chunks([chunk("a", logprobs=[-1.0]), chunk(" b", logprobs=[-2.0]),
                                   chunk(" c", common_pb2.FINISH_REASON_STOP, [-3.0], (1, 3))])
    assert merged.text == "a b c" and list(merged.logprobs) == [-1.0, -2.0, -3.0]
    assert merged.finish_reason == common_pb2.FINISH_REASON_STOP
    assert merged.usage.completion_tokens == 3 and merged.served_by.simulated


def test_stream_error_names_the_status_and_request():
    req = request(text(), id="bad-1", model="nope")
    err = mapping.stream_error(req, "NOT_FOUND", "model 'nope' is not served")
    assert err.error_message == "NOT_FOUND: model 'nope' is not served"
    assert err.infer_response.id == "bad-1" and err.infer_response.model_name == "nope"


def test_model_metadata_lists_trtllm_tensors():
    md = mapping.model_metadata("echo")
    assert (md.name, list(md.versions), md.platform) == ("echo", ["1"], "meshserve")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in md.inputs}
    assert inputs["text_input"] == ("BYTES", [-1, 1])
    assert inputs["max_tokens"] == ("INT32", [-1, 1])
    assert inputs["stream"][0] == "BOOL" and inputs["random_seed"][0] == "UINT64"
    assert inputs["stop_words"] == ("BYTES", [-1, -1])
    assert {t.name: t.datatype for t in md.outputs} == {"text_output": "BYTES",
                                                        "output_log_probs": "FP32"}


# --- wire contract -----------------------------------------------------------------------------

_DUMP = r"""
import json, sys, importlib
from google.protobuf import descriptor_pb2
mod = importlib.import_module(sys.argv[1])
fdp = descriptor_pb2.FileDescriptorProto()
mod.DESCRIPTOR.CopyToProto(fdp)
out = {"package": fdp.package, "messages": {}, "methods": {}}
def walk(msg, prefix):
    name = prefix + msg.name
    out["messages"][name] = {f.name: [f.number, f.type, f.label, f.type_name]
                             for f in msg.field}
    for nested in msg.nested_type:
        walk(nested, name + ".")
for m in fdp.message_type:
    walk(m, "")
for s in fdp.service:
    for m in s.method:
        out["methods"][s.name + "/" + m.name] = [m.input_type, m.output_type,
                                                 m.client_streaming, m.server_streaming]
print(json.dumps(out))
"""


def _descriptor(module: str) -> dict:
    # tritonclient registers the same `inference.*` symbols in protobuf's default pool, so the two
    # modules cannot be imported into one process: each is read in its own interpreter.
    done = subprocess.run([sys.executable, "-c", _DUMP, module], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_proto_is_wire_compatible_with_tritonclient():
    ours = _descriptor("inference.grpc_service_pb2")
    theirs = _descriptor("tritonclient.grpc.service_pb2")
    assert ours["package"] == theirs["package"] == "inference"
    for name, fields in ours["messages"].items():
        assert fields == theirs["messages"].get(name), f"message {name} differs from Triton's"
    for name, signature in ours["methods"].items():
        assert signature == theirs["methods"].get(name), f"rpc {name} differs from Triton's"
    assert len(ours["methods"]) == 7
