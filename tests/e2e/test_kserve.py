"""The KServe v2 / Triton gRPC protocol on a real mesh, driven by the unmodified tritonclient.

tritonclient registers the `inference.*` protobuf symbols that our own generated stubs register
too (the unit tests load those), and protobuf refuses the same symbol twice in one process. So the
client runs in one spawned worker process: each test sends it a plain function below (named
`client_*`) with plain arguments and gets plain data back; the asserts stay here. Nothing in this
module's top level may import tritonclient or `inference`.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import running_mesh

pytestmark = pytest.mark.e2e

MODEL = "echo"
KSERVE_SERVICE = "inference.GRPCInferenceService"
CALL_TIMEOUT_S = 90

# An input as plain data: (name, KServe datatype, nested list whose shape is the tensor's shape).
Inputs = list[tuple[str, str, Any]]


def prompt_inputs(prompt: str, max_tokens: int | None = None, stream: bool | None = None,
                  **extra: tuple[str, Any]) -> Inputs:
    inputs: Inputs = [("text_input", "BYTES", [[prompt]])]
    if max_tokens is not None:
        inputs.append(("max_tokens", "INT32", [[max_tokens]]))
    if stream is not None:
        inputs.append(("stream", "BOOL", [[stream]]))
    inputs += [(name, datatype, value) for name, (datatype, value) in extra.items()]
    return inputs


# --- run in the tritonclient worker ------------------------------------------------------------

def _client(url: str):
    import tritonclient.grpc as grpcclient

    return grpcclient.InferenceServerClient(url=url)


def _infer_inputs(inputs: Inputs) -> list:
    import numpy as np
    import tritonclient.grpc as grpcclient

    dtypes = {"BYTES": object, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
              "FP32": np.float32, "UINT64": np.uint64}
    out = []
    for name, datatype, value in inputs:
        data: np.ndarray = np.array(value, dtype=dtypes[datatype])
        if datatype == "BYTES":
            data = np.vectorize(lambda s: s.encode(), otypes=[object])(data)
        tensor = grpcclient.InferInput(name, list(data.shape), datatype)
        tensor.set_data_from_numpy(data)
        out.append(tensor)
    return out


def _error(exc) -> dict:
    return {"status": exc.status(), "message": exc.message()}


def _params(response) -> dict:
    return {k: getattr(v, v.WhichOneof("parameter_choice")) for k, v in response.parameters.items()}


def _result(result) -> dict:
    texts = result.as_numpy("text_output")
    log_probs = result.as_numpy("output_log_probs")
    response = result.get_response()
    return {"text": "".join(t.decode() for t in texts.reshape(-1)) if texts is not None else None,
            "shape": list(texts.shape) if texts is not None else None,
            "log_probs": log_probs.tolist() if log_probs is not None else None,
            "id": response.id, "params": _params(response)}


def client_probe(url: str, model: str) -> dict:
    """Health and metadata as tritonclient sees them."""
    from tritonclient.utils import InferenceServerException

    c = _client(url)
    md = c.get_model_metadata(model)
    server = c.get_server_metadata()
    out: dict[str, Any] = {
        "live": c.is_server_live(), "ready": c.is_server_ready(),
        "model_ready": c.is_model_ready(model), "unknown_ready": c.is_model_ready("no-such-model"),
        "other_version_ready": c.is_model_ready(model, model_version="7"),
        "server": (server.name, server.version, list(server.extensions)),
        "metadata": {"name": md.name, "platform": md.platform, "versions": list(md.versions),
                     "inputs": {t.name: (t.datatype, list(t.shape)) for t in md.inputs},
                     "outputs": {t.name: (t.datatype, list(t.shape)) for t in md.outputs}}}
    for key, call in (("unknown_metadata", lambda: c.get_model_metadata("no-such-model")),
                      ("empty_ready", lambda: c.is_model_ready(""))):
        try:
            call()
            out[key] = None
        except InferenceServerException as exc:
            out[key] = _error(exc)
    c.close()
    return out


def client_infer(url: str, model: str, inputs: Inputs, request_id: str = "") -> dict:
    from tritonclient.utils import InferenceServerException

    c = _client(url)
    try:
        return _result(c.infer(model, _infer_inputs(inputs), request_id=request_id))
    except InferenceServerException as exc:
        return {"error": _error(exc)}
    finally:
        c.close()


def client_stream(url: str, requests: list[tuple[str, Inputs, str]], sequential: bool = False,
                  empty_final: bool = False, timeout: float = 60) -> list[dict]:
    """Send requests on one stream; collect every callback until each request ended (its final
    response or an error). `sequential`: wait for each request to end before sending the next."""
    import queue

    events: queue.Queue = queue.Queue()
    c = _client(url)
    c.start_stream(callback=lambda result, error: events.put((result, error)))
    seen: list[dict] = []

    def wait_ends(n: int) -> None:
        while n:
            result, error = events.get(timeout=timeout)
            if error is not None:
                seen.append({"error": str(error)})
                n -= 1
                continue
            event = _result(result)
            seen.append(event)
            n -= bool(event["params"].get("triton_final_response"))

    try:
        for model, inputs, request_id in requests:
            c.async_stream_infer(model, _infer_inputs(inputs), request_id=request_id,
                                 enable_empty_final_response=empty_final)
            if sequential:
                wait_ends(1)
        if not sequential:
            wait_ends(len(requests))
        c.stop_stream()
    finally:
        c.close()
    return seen


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("kserve-mesh"), base_port=0, lease_ttl=3,
                    servers=[ServerPlan("server-0", [f"{MODEL}=sim"],
                                        engine_options=["tokens_per_second=1000"])])
    with running_mesh(plan) as m:
        yield m


@pytest.fixture(scope="module")
def triton():
    """Runs client_* functions in a worker process that may import tritonclient."""
    if importlib.util.find_spec("tritonclient") is None:
        pytest.fail("tritonclient is not installed; install it the way the Makefile does: "
                    "`.venv/bin/pip install --no-deps tritonclient==2.73.0` (its protobuf<7 pin "
                    "conflicts with our protobuf 7 stubs)")
    pool = multiprocessing.get_context("spawn").Pool(1)

    def run(fn, *args, **kwargs):
        return pool.apply_async(fn, args, kwargs).get(timeout=CALL_TIMEOUT_S)

    try:
        yield run
    finally:
        pool.terminate()
        pool.join()


@pytest.fixture(scope="module", params=["router", "envoy"])
def url(request, mesh) -> str:
    """Every protocol test runs against a router directly and through the Envoy edge."""
    return mesh.routers[0] if request.param == "router" else mesh.envoy


# --- tests -------------------------------------------------------------------------------------

def test_router_reports_the_kserve_service_healthy_and_in_reflection(mesh):
    with grpc.insecure_channel(mesh.routers[0]) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=KSERVE_SERVICE), timeout=5)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING
        listing = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
        services = {s.name for r in listing for s in r.list_services_response.service}
    assert {KSERVE_SERVICE, "meshserve.v1.InferenceService"} <= services


def test_health_and_metadata(triton, url):
    p = triton(client_probe, url, MODEL)
    assert p["live"] and p["ready"] and p["model_ready"]
    assert not p["unknown_ready"] and not p["other_version_ready"]
    assert p["server"][0] == "meshserve" and p["server"][1]
    md = p["metadata"]
    assert (md["name"], md["platform"], md["versions"]) == (MODEL, "meshserve", ["1"])
    assert md["inputs"]["text_input"] == ("BYTES", [-1, 1])
    assert md["inputs"]["max_tokens"] == ("INT32", [-1, 1])
    assert md["inputs"]["stream"][0] == "BOOL"
    assert md["outputs"]["text_output"] == ("BYTES", [-1, -1])
    assert p["unknown_metadata"]["status"] == "StatusCode.NOT_FOUND"
    assert "no-such-model" in p["unknown_metadata"]["message"]
    assert p["empty_ready"]["status"] == "StatusCode.INVALID_ARGUMENT"


def test_unary_infer_returns_the_whole_answer(triton, url):
    r = triton(client_infer, url, MODEL, prompt_inputs("alpha beta gamma", 5), request_id="u-1")
    assert r["text"] == "alpha beta gamma alpha beta"
    assert r["shape"] == [1, 1] and r["id"] == "u-1"
    assert r["params"]["meshserve_simulated"] is True
    assert r["params"]["meshserve_finish_reason"] == "length"
    assert r["params"]["meshserve_completion_tokens"] == 5
    assert r["params"]["meshserve_server_id"] == "server-0"


def test_unary_infer_with_sampling_inputs_and_log_probs(triton, url):
    inputs = prompt_inputs("one two three", 4, stream=False,
                           temperature=("FP32", [[0.0]]), top_p=("FP32", [[1.0]]),
                           top_k=("INT32", [[1]]), random_seed=("UINT64", [[7]]),
                           return_log_probs=("BOOL", [[True]]),
                           stop_words=("BYTES", [["", "three"]]))
    r = triton(client_infer, url, MODEL, inputs)
    assert r["text"] == "one two "  # stopped before "three", which is not returned
    assert r["params"]["meshserve_finish_reason"] == "stop"
    assert r["log_probs"] is not None and len(r["log_probs"][0][0]) == 2


def test_streaming_gives_one_response_per_token(triton, url):
    unary = triton(client_infer, url, MODEL, prompt_inputs("one two", 6))["text"]
    events = triton(client_stream, url, [(MODEL, prompt_inputs("one two", 6, stream=True), "s-1")])
    assert [e["text"] for e in events] == ["one", " two", " one", " two", " one", " two"]
    assert "".join(e["text"] for e in events) == unary == "one two one two one two"
    assert [e["params"]["triton_final_response"] for e in events] == [False] * 5 + [True]
    assert {e["id"] for e in events} == {"s-1"}


def test_streaming_with_empty_final_response(triton, url):
    events = triton(client_stream, url, [(MODEL, prompt_inputs("a b", 3, stream=True), "e-1")],
                    empty_final=True)
    assert [e["text"] for e in events] == ["a", " b", " a", None]
    assert [e["params"]["triton_final_response"] for e in events] == [False, False, False, True]


def test_stream_without_stream_flag_answers_once(triton, url):
    events = triton(client_stream, url, [(MODEL, prompt_inputs("x y z", 4), "w-1")])
    assert [e["text"] for e in events] == ["x y z x"]
    assert events[0]["params"]["triton_final_response"] is True


def test_concurrent_requests_on_one_stream(triton, url):
    requests = [(MODEL, prompt_inputs(f"p{i} q{i}", 4, stream=True), f"c-{i}") for i in range(4)]
    events = triton(client_stream, url, requests)
    by_id: dict[str, str] = {}
    for e in events:
        by_id[e["id"]] = by_id.get(e["id"], "") + e["text"]
    assert by_id == {f"c-{i}": f"p{i} q{i} p{i} q{i}" for i in range(4)}


BAD_INPUTS = [
    pytest.param("no-such-model", prompt_inputs("hi", 2), "StatusCode.NOT_FOUND",
                 "'no-such-model' is not served", id="unknown-model"),
    pytest.param(MODEL, [("max_tokens", "INT32", [[2]])], "StatusCode.INVALID_ARGUMENT",
                 "'text_input' (BYTES", id="missing-text_input"),
    pytest.param(MODEL, [("text_input", "BYTES", [["hi"]]), ("max_tokens", "INT64", [[2]])],
                 "StatusCode.INVALID_ARGUMENT", "'max_tokens' must be INT32", id="wrong-dtype"),
    pytest.param(MODEL, [("text_input", "BYTES", [["a", "b"]])], "StatusCode.INVALID_ARGUMENT",
                 "shape [1] or [1, 1]", id="bad-shape"),
    pytest.param(MODEL, prompt_inputs("hi", -1), "StatusCode.INVALID_ARGUMENT",
                 "max_tokens must be >= 0", id="negative-max_tokens"),
    pytest.param(MODEL, prompt_inputs("hi", 2, unknown=("INT32", [[1]])),
                 "StatusCode.INVALID_ARGUMENT", "unexpected input 'unknown'", id="unknown-input"),
]


@pytest.mark.parametrize("model, inputs, status, words", BAD_INPUTS)
def test_bad_unary_input_gets_a_precise_status(triton, url, mesh, model, inputs, status, words):
    r = triton(client_infer, url, model, inputs)
    assert r["error"]["status"] == status
    assert words in r["error"]["message"]
    assert all(ch.alive() for ch in mesh.children.values())


def test_stream_flag_on_unary_infer_is_refused(triton, url):
    r = triton(client_infer, url, MODEL, prompt_inputs("hi", 2, stream=True))
    assert r["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "ModelStreamInfer" in r["error"]["message"]


@pytest.mark.parametrize("model, inputs, status, words", BAD_INPUTS)
def test_bad_stream_input_is_reported_and_the_stream_stays_open(triton, url, model, inputs,
                                                                status, words):
    good = (MODEL, prompt_inputs("still here", 3, stream=True), "ok")
    events = triton(client_stream, url, [(model, inputs, "bad"), good], sequential=True)
    assert "error" in events[0], events
    assert events[0]["error"].startswith(status.removeprefix("StatusCode.") + ": ")
    assert words in events[0]["error"]
    assert "".join(e["text"] for e in events[1:]) == "still here still"


def test_everything_still_up_after_bad_input(triton, mesh):
    assert all(ch.alive() for ch in mesh.children.values())
    r = triton(client_infer, mesh.envoy, MODEL, prompt_inputs("fine now", 2))
    assert r["text"] == "fine now"
