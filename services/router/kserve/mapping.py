"""KServe v2 inference requests and responses <-> MeshServe's GenerateRequest / GenerateResponse.

Tensor names and datatypes are those of Triton's TensorRT-LLM backend ("ensemble" and
"tensorrt_llm_bls" models), so clients written for it work unchanged: the prompt goes in
`text_input`, sampling settings in one-element tensors, the answer comes back in `text_output`.
Plain functions, no gRPC: each problem raises InvalidInput (INVALID_ARGUMENT) or UnknownVersion
(NOT_FOUND) with a message that names the tensor and says what to send instead; value ranges are
checked with every other request's by services/common/validation.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from inference import grpc_service_pb2 as kserve_pb2
from meshserve.v1 import common_pb2
from meshserve.v1 import inference_pb2 as meshserve_pb2

from services.common.errors import InvalidArgument, NotFound

from .tensors import TensorError, Value, encode_raw, read_values

PLATFORM = "meshserve"
#: Every model has exactly one version as far as KServe clients are concerned.
MODEL_VERSION = "1"
#: Request parameter (set by tritonclient's enable_empty_final_response) asking for an extra,
#: output-less response that only says "this request is complete".
EMPTY_FINAL_PARAM = "triton_enable_empty_final_response"
#: Response parameter on every streamed response: whether it is the request's last one.
FINAL_PARAM = "triton_final_response"


class InvalidInput(InvalidArgument):
    """The request cannot be served as sent (INVALID_ARGUMENT)."""


class UnknownVersion(NotFound):
    """The model exists but not in the asked-for version (NOT_FOUND)."""


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    #: As ModelMetadata reports it: the first axis is the batch, -1 means any size.
    shape: tuple[int, ...]
    #: One element per request (a setting), as opposed to a list.
    scalar: bool = True


INPUTS: dict[str, TensorSpec] = {s.name: s for s in (
    TensorSpec("text_input", "BYTES", (-1, 1)),
    TensorSpec("max_tokens", "INT32", (-1, 1)),
    TensorSpec("stream", "BOOL", (-1, 1)),
    TensorSpec("temperature", "FP32", (-1, 1)),
    TensorSpec("top_p", "FP32", (-1, 1)),
    TensorSpec("top_k", "INT32", (-1, 1)),
    TensorSpec("random_seed", "UINT64", (-1, 1)),
    TensorSpec("stop_words", "BYTES", (-1, -1), scalar=False),
    TensorSpec("return_log_probs", "BOOL", (-1, 1)),
    # Accepted only at the value we implement, because TensorRT-LLM client scripts send them.
    TensorSpec("beam_width", "INT32", (-1, 1)),
    TensorSpec("exclude_input_in_output", "BOOL", (-1, 1)),
)}
OUTPUTS: dict[str, TensorSpec] = {s.name: s for s in (
    TensorSpec("text_output", "BYTES", (-1, -1)),
    TensorSpec("output_log_probs", "FP32", (-1, -1, -1), scalar=False),
)}


@dataclass(frozen=True)
class InferCall:
    """One KServe inference request, translated."""

    generate: meshserve_pb2.GenerateRequest
    #: The `stream` input: answer with one response per generated chunk (decoupled).
    stream: bool
    #: text_input came with a batch axis ([1, 1]); outputs then carry one too.
    batched: bool
    #: Output tensors to return, in order.
    outputs: tuple[str, ...]
    #: The caller's request id, echoed in every response.
    request_id: str
    #: The caller asked for an output-less final response (decoupled streams).
    empty_final: bool


def check_version(model: str, version: str) -> None:
    if version not in ("", MODEL_VERSION):
        raise UnknownVersion(f"model {model!r} has no version {version!r}; MeshServe serves "
                             f"version {MODEL_VERSION!r} (or leave the version empty)")


def _raw_entries(req: kserve_pb2.ModelInferRequest) -> list[bytes | None]:
    """raw_input_contents aligned with inputs (None where an input uses typed contents)."""
    if not req.raw_input_contents:
        return [None] * len(req.inputs)
    if len(req.raw_input_contents) != len(req.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(req.raw_input_contents)} entries for {len(req.inputs)} "
            "inputs; give one raw entry per input (in the same order), or none and use contents")
    for tensor in req.inputs:
        if tensor.HasField("contents") and tensor.contents.ByteSize():
            raise InvalidInput(f"input {tensor.name!r} has both contents and raw_input_contents; "
                               "use one or the other")
    return list(req.raw_input_contents)


def _check_shape(spec: TensorSpec, shape: Sequence[int]) -> None:
    """Batch size 1: [n] or [1, n]; settings and text_input hold exactly one element."""
    dims = list(shape)
    batch_ok = len(dims) == 1 or (len(dims) == 2 and dims[0] == 1)
    if spec.scalar and not (batch_ok and dims[-1] == 1):
        raise InvalidInput(f"input {spec.name!r} must hold one element, shape [1] or [1, 1] "
                           f"(batch size 1; send one request per prompt), got {dims}")
    if not spec.scalar and not batch_ok:
        raise InvalidInput(f"input {spec.name!r} must have shape [n] or [1, n] (batch size 1), "
                           f"got {dims}")


def _utf8(name: str, value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"input {name!r} is not valid UTF-8 ({exc.reason} at byte "
                           f"{exc.start})") from None


def read_inputs(req: kserve_pb2.ModelInferRequest) -> dict[str, tuple[list[Value], int]]:
    """Each input's elements and rank, checked against INPUTS."""
    out: dict[str, tuple[list[Value], int]] = {}
    for tensor, raw in zip(req.inputs, _raw_entries(req), strict=True):
        spec = INPUTS.get(tensor.name)
        if spec is None:
            raise InvalidInput(f"unexpected input {tensor.name!r}; this endpoint takes "
                               f"{', '.join(INPUTS)}")
        if tensor.name in out:
            raise InvalidInput(f"input {tensor.name!r} is given more than once")
        if tensor.datatype != spec.datatype:
            raise InvalidInput(f"input {tensor.name!r} must be {spec.datatype}, got datatype "
                               f"{tensor.datatype!r}")
        _check_shape(spec, tensor.shape)
        try:
            values = read_values(tensor, raw)
        except TensorError as exc:
            raise InvalidInput(str(exc)) from None
        out[tensor.name] = (values, len(tensor.shape))
    return out


def _sampling(values: dict[str, tuple[list[Value], int]], s: common_pb2.SamplingParams) -> None:
    """Copy the settings tensors into the request; their ranges are checked once, with every other
    request's, by services/common/validation.py (its messages use the same names)."""
    def one(name: str) -> int | float | None:
        """A numeric input's value (read_inputs checked every datatype against INPUTS)."""
        if name not in values:
            return None
        value = values[name][0][0]
        if isinstance(value, bytes):
            raise InvalidInput(f"input {name!r} must be a number")
        return value

    if (v := one("max_tokens")) is not None:
        s.max_tokens = int(v)
    if (v := one("temperature")) is not None:
        s.temperature = float(v)
    if (v := one("top_p")) is not None:
        s.top_p = float(v)
    if (v := one("top_k")) is not None:
        s.top_k = int(v)
    if (v := one("random_seed")) is not None:
        s.seed = int(v)
    if (v := one("beam_width")) is not None and v != 1:
        raise InvalidInput(f"input 'beam_width' must be 1 (MeshServe samples one sequence), got {v!r}")
    if (v := one("exclude_input_in_output")) is not None and not v:
        raise InvalidInput("input 'exclude_input_in_output' must be true: text_output never "
                           "repeats the prompt here (or leave the input out)")
    # An empty stop word cannot match anything meaningful: TensorRT-LLM clients send [""] for none.
    words = [b for b in values.get("stop_words", ([], 0))[0] if isinstance(b, bytes)]  # BYTES by INPUTS
    s.stop.extend(w for w in (_utf8("stop_words", b) for b in words) if w)
    s.logprobs = bool(one("return_log_probs"))


def _requested_outputs(req: kserve_pb2.ModelInferRequest, logprobs: bool) -> tuple[str, ...]:
    if not req.outputs:
        return ("text_output", "output_log_probs") if logprobs else ("text_output",)
    names: list[str] = []
    for out in req.outputs:
        if out.name not in OUTPUTS:
            raise InvalidInput(f"unexpected requested output {out.name!r}; this endpoint returns "
                               f"{', '.join(OUTPUTS)}")
        if out.name not in names:
            names.append(out.name)
    return tuple(names)


def to_generate(req: kserve_pb2.ModelInferRequest) -> InferCall:
    """Translate and check one ModelInferRequest (the model's existence is the caller's check)."""
    if not req.model_name:
        raise InvalidInput("model_name is required (see the models a router serves with "
                           "ModelReady / ModelMetadata, or `meshctl status`)")
    check_version(req.model_name, req.model_version)
    values = read_inputs(req)
    if "text_input" not in values:
        raise InvalidInput("input 'text_input' (BYTES, shape [1] or [1, 1]) is required: it holds "
                           "the prompt")
    (prompt_bytes,), rank = values["text_input"]
    prompt = _utf8("text_input", prompt_bytes)  # type: ignore[arg-type]  # BYTES by INPUTS
    if not prompt:
        raise InvalidInput("input 'text_input' is empty; it holds the prompt")
    generate = meshserve_pb2.GenerateRequest(model=req.model_name, prompt=prompt,
                                             request_id=req.id)
    _sampling(values, generate.sampling)
    outputs = _requested_outputs(req, generate.sampling.logprobs)
    if "output_log_probs" in outputs:
        generate.sampling.logprobs = True
    empty_final = req.parameters[EMPTY_FINAL_PARAM].bool_param \
        if EMPTY_FINAL_PARAM in req.parameters else False
    stream = bool(values["stream"][0][0]) if "stream" in values else False
    return InferCall(generate=generate, stream=stream, batched=rank == 2, outputs=outputs,
                     request_id=req.id, empty_final=empty_final)


def _set_parameters(params, chunk: meshserve_pb2.GenerateResponse) -> None:
    """Where the answer came from (always saying when it is simulated) and, last, how it ended."""
    sb = chunk.served_by
    params["meshserve_server_id"].string_param = sb.server_id
    params["meshserve_router_id"].string_param = sb.router_id
    params["meshserve_backend"].string_param = sb.backend
    params["meshserve_simulated"].bool_param = sb.simulated
    params["meshserve_request_id"].string_param = chunk.request_id
    if sb.deployment:
        params["meshserve_deployment"].string_param = sb.deployment
    if sb.route:
        params["meshserve_route"].string_param = sb.route
    if chunk.finish_reason:
        name = common_pb2.FinishReason.Name(chunk.finish_reason)
        params["meshserve_finish_reason"].string_param = name.removeprefix("FINISH_REASON_").lower()
    if chunk.HasField("usage"):
        params["meshserve_prompt_tokens"].int64_param = chunk.usage.prompt_tokens
        params["meshserve_completion_tokens"].int64_param = chunk.usage.completion_tokens


def _empty_response(call: InferCall) -> kserve_pb2.ModelInferResponse:
    return kserve_pb2.ModelInferResponse(model_name=call.generate.model,
                                         model_version=MODEL_VERSION, id=call.request_id)


def to_infer_response(call: InferCall, chunk: meshserve_pb2.GenerateResponse,
                      final: bool | None = None) -> kserve_pb2.ModelInferResponse:
    """The requested outputs of one chunk (or a merged answer), as raw tensors like Triton's.

    `final` is set on streamed responses only: it becomes the triton_final_response parameter.
    """
    resp = _empty_response(call)
    for name in call.outputs:
        spec = OUTPUTS[name]
        if name == "text_output":
            shape, data = [1], encode_raw("BYTES", [chunk.text.encode("utf-8")])
        else:
            shape, data = [1, len(chunk.logprobs)], encode_raw("FP32", list(chunk.logprobs))
        resp.outputs.add(name=name, datatype=spec.datatype, shape=[1, *shape] if call.batched
                         else shape)
        resp.raw_output_contents.append(data)
    _set_parameters(resp.parameters, chunk)
    if final is not None:
        resp.parameters[FINAL_PARAM].bool_param = final
    return resp


def final_marker(call: InferCall) -> kserve_pb2.ModelInferResponse:
    """The output-less response that closes a request on a stream."""
    resp = _empty_response(call)
    resp.parameters[FINAL_PARAM].bool_param = True
    return resp


def stream_error(req: kserve_pb2.ModelInferRequest, code_name: str, message: str
                 ) -> kserve_pb2.ModelStreamInferResponse:
    """A failed request on a stream: the status goes in error_message (there is no status field),
    the model and id in infer_response so a client with many requests in flight can match it."""
    return kserve_pb2.ModelStreamInferResponse(
        error_message=f"{code_name}: {message}",
        infer_response=kserve_pb2.ModelInferResponse(
            model_name=req.model_name, model_version=req.model_version, id=req.id))


def model_metadata(name: str) -> kserve_pb2.ModelMetadataResponse:
    resp = kserve_pb2.ModelMetadataResponse(name=name, versions=[MODEL_VERSION], platform=PLATFORM)
    for spec in INPUTS.values():
        resp.inputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    for spec in OUTPUTS.values():
        resp.outputs.add(name=spec.name, datatype=spec.datatype, shape=spec.shape)
    return resp
