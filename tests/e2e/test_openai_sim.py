"""The OpenAI API through Envoy on a real mesh with the sim engine: the official openai SDK chats,
streams and completes; raw HTTP sees server-sent events; errors come in OpenAI's shape with their
HTTP statuses (400, 404, 405, 429 with retry-after, 503); a router that dies mid-stream is resumed
by the gateway; a stopped gateway leaves Envoy answering in OpenAI's shape."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator

import grpc
import openai
import pytest
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import metrics_text, running_mesh, sim_text, wait_for

pytestmark = pytest.mark.e2e

FAST, SLOW, TIGHT = "echo", "slow", "tight"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory) -> Iterator[LocalMesh]:
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("openai-sim"), base_port=0, lease_ttl=3, routers=2,
                    gateways=1,
                    servers=[ServerPlan("server-0", [f"{FAST}=sim"], engine_options=["tokens_per_second=1000"]),
                             ServerPlan("server-1", [f"{SLOW}=sim", f"{TIGHT}=sim"],
                                        engine_options=["tokens_per_second=25", "max_running=1"])])
    with running_mesh(plan) as m:
        yield m


@pytest.fixture
def client(mesh: LocalMesh) -> Iterator[openai.OpenAI]:
    # No SDK retries: each test sees the gateway's own answer.
    with openai.OpenAI(base_url=f"http://{mesh.envoy}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


def user(text: str) -> list:
    return [{"role": "user", "content": text}]


def test_sdk_chat_and_stream(client):
    raw = client.chat.completions.with_raw_response.create(
        model=FAST, messages=user("one two three"), max_tokens=5, temperature=0, logprobs=True)
    answer = raw.parse()
    assert raw.headers["x-meshserve-simulated"] == "true" and raw.headers["x-meshserve-backend"] == "sim"
    assert answer.id.startswith("chatcmpl-") and answer.object == "chat.completion" and answer.model == FAST
    choice = answer.choices[0]
    assert choice.message.content == sim_text("one two three", 5) and choice.finish_reason == "length"
    assert "".join(t.token for t in choice.logprobs.content) == choice.message.content
    assert answer.usage.completion_tokens == 5 and answer.usage.prompt_tokens > 0
    assert answer.usage.prompt_tokens_details.cached_tokens >= 0
    assert answer.system_fingerprint == "meshserve-sim-simulated"

    chunks = list(client.chat.completions.create(model=FAST, messages=user("one two three"), max_tokens=5,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_sdk_completions_models_and_n(client):
    out = client.completions.create(model=FAST, prompt=["a b", "c d"], n=2, max_tokens=3, echo=True, seed=3)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert [c.text for c in out.choices] == ["a b" + sim_text("a b", 3)] * 2 + ["c d" + sim_text("c d", 3)] * 2
    assert out.usage.completion_tokens == 12
    streamed = list(client.completions.create(model=FAST, prompt="x y z", max_tokens=4, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == sim_text("x y z", 4)
    assert streamed[-1].choices[0].finish_reason == "length"
    chats = client.chat.completions.create(model=FAST, messages=user("p q"), n=3, max_tokens=2, temperature=0)
    assert sorted(c.index for c in chats.choices) == [0, 1, 2] and chats.usage.completion_tokens == 6

    ids = {m.id for m in client.models.list()}
    assert {FAST, SLOW, TIGHT} <= ids
    model = client.models.retrieve(FAST)
    assert model.id == FAST and model.owned_by == "meshserve"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_wrong_model_is_404_in_openai_shape(client):
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model="no-such-model", messages=user("hi"), stream=stream)
        assert err.value.status_code == 404
        assert err.value.code == "model_not_found" and err.value.param == "model"
        assert err.value.type == "invalid_request_error" and FAST in err.value.message
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=FAST, messages=user("hi"), temperature=7)
    assert bad.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(model=FAST, messages=user("hi"),
                                       tools=[{"type": "function", "function": {"name": "f"}}])
    assert tools.value.param == "tools"


def _raw(mesh: LocalMesh, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    """What curl would see: the status, headers and raw body bytes."""
    host, port = mesh.envoy.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json"} if body else {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_raw_http_sse_and_errors(mesh):
    body = json.dumps({"model": FAST, "messages": user("u v"), "max_tokens": 3, "stream": True}).encode()
    status, headers, out = _raw(mesh, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in out.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]]
    assert "".join(deltas) == sim_text("u v", 3)

    status, headers, out = _raw(mesh, "POST", "/v1/chat/completions", b'{"model": "echo", "messages": [')
    assert status == 400 and headers["content-type"].startswith("application/json")
    error = json.loads(out)["error"]
    assert error["type"] == "invalid_request_error" and "not valid JSON" in error["message"]
    status, _, out = _raw(mesh, "POST", "/v1/completions", b'{"model": "echo"}')
    assert status == 400 and json.loads(out)["error"]["param"] == "prompt"
    status, headers, out = _raw(mesh, "GET", "/v1/chat/completions")
    assert status == 405 and headers["allow"] == "POST" and json.loads(out)["error"]["message"]
    status, _, out = _raw(mesh, "GET", "/v1/meshserve/models")  # MeshServe's own list, transcoded
    assert status == 200 and FAST in {m["name"] for m in json.loads(out)["models"]}


def test_shed_is_429_with_retry_after_and_no_replica_is_503(mesh, client):
    hold = client.chat.completions.create(model=TIGHT, messages=user("hold the only slot"), max_tokens=400,
                                          stream=True)
    try:
        next(iter(hold))  # the one slot of TIGHT is busy from here

        def shed() -> openai.RateLimitError | None:
            try:  # a probe that got in waits for the slot; the timeout lets it go (and cancels it)
                client.with_options(timeout=1.5).chat.completions.create(
                    model=TIGHT, messages=user("x"), max_tokens=1, service_tier="flex")
            except openai.RateLimitError as exc:
                return exc
            except openai.APITimeoutError:
                return None
            return None

        err = wait_for(shed, 30, "a flex request to be shed while the model is saturated")
        assert err.status_code == 429 and err.type == "rate_limit_error"
        assert float(err.response.headers["retry-after"]) >= 1 and int(err.response.headers["retry-after-ms"]) > 0
    finally:
        hold.close()

    with grpc.insecure_channel(mesh.controlplane) as channel:
        stub = controlplane_pb2_grpc.ControlPlaneServiceStub(channel)
        stub.DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(name="ghost", backend="sim", replicas=1)),
                         timeout=30)
        stub.ScaleModel(cp.ScaleModelRequest(name="ghost", replicas=0), timeout=30)

    def unavailable() -> openai.InternalServerError | None:
        try:
            client.chat.completions.create(model="ghost", messages=user("x"), max_tokens=1)
        except openai.InternalServerError as exc:
            return exc if exc.status_code == 503 else None
        except openai.APIStatusError:
            return None
        return None

    err503 = wait_for(unavailable, 30, "503 for a model with no ready replica")
    assert err503.code == "service_unavailable" and err503.response.headers["retry-after"]


def _sample(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_stopped_gateway_is_an_openai_503_from_envoy_then_it_comes_back(mesh, client):
    mesh.sup.stop_child(mesh.children["gateway0"])
    body = json.dumps({"model": FAST, "messages": user("a")}).encode()

    def envoy_answers_503() -> dict | None:
        status, headers, out = _raw(mesh, "POST", "/v1/chat/completions", body)
        return json.loads(out)["error"] if status == 503 and "json" in headers["content-type"] else None

    error = wait_for(envoy_answers_503, 30, "Envoy to answer 503 without a gateway")
    assert error["type"] == "server_error" and error["message"]
    mesh.start_gateway(0)
    wait_for(lambda: _raw(mesh, "POST", "/v1/chat/completions", body)[0] == 200, 30, "the gateway back")


def test_router_death_mid_stream_is_resumed_by_the_gateway(mesh, client):
    prompt = "alpha beta gamma delta"
    expected = client.chat.completions.create(model=FAST, messages=user(prompt), max_tokens=60,
                                              temperature=0).choices[0].message.content
    raw = client.chat.completions.with_raw_response.create(model=SLOW, messages=user(prompt), max_tokens=60,
                                                           temperature=0, stream=True)
    router = raw.headers["x-meshserve-router"]
    stream = iter(raw.parse())
    texts = [next(stream).choices[0].delta.content or "" for _ in range(5)]
    mesh.sup.kill(mesh.children[router])
    try:
        texts += [c.choices[0].delta.content or "" for c in stream if c.choices]
    finally:
        mesh.start_router(int(router.removeprefix("router")))
    assert "".join(texts) == expected  # the sim engine's answer depends only on prompt and position
    assert _sample(metrics_text(mesh.metrics["gateway0"]), "meshserve_openai_resumes_total") >= 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_hangs_up_frees_its_slot(client, stream):
    """TIGHT runs one sequence at a time: the next request gets the slot only if the gateway
    cancelled the abandoned generation (400 tokens at 25/s would hold it for 16 s)."""
    if stream:
        answer = client.chat.completions.create(model=TIGHT, messages=user("abandoned"), max_tokens=400,
                                                stream=True)
        next(iter(answer))
        answer.close()  # hangs up mid-stream
    else:
        with pytest.raises(openai.APITimeoutError):  # hangs up while the whole answer is computed
            client.with_options(timeout=1.0).chat.completions.create(model=TIGHT, messages=user("abandoned"),
                                                                     max_tokens=400)
    out = client.with_options(timeout=8.0).chat.completions.create(model=TIGHT, messages=user("next please"),
                                                                    max_tokens=2)
    assert out.choices[0].message.content == sim_text("next please", 2)
