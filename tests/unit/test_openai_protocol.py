"""The OpenAI gateway's pure parts: request bodies to Jobs, chunks to OpenAI objects, errors to
HTTP, headers to metadata. The e2e tests (tests/e2e/test_openai_*.py) show them on a real mesh."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from meshserve.v1 import common_pb2, inference_pb2

from services.common.errors import NotFound, ResourceExhausted, ServiceError, Unavailable
from services.common.validation import Priority
from services.openai_gateway import render
from services.openai_gateway.errors import BadField, http_error
from services.openai_gateway.protocol import MAX_CHOICES, parse_chat, parse_completion
from services.openai_gateway.upstream import build_requests, forwarded_metadata, request_id

USER = [{"role": "user", "content": "hi"}]


def chat(**fields):
    return parse_chat({"model": "m", "messages": USER, **fields})


def test_chat_defaults_follow_openai():
    job = chat()
    assert job.kind == "chat" and job.model == "m" and job.n == 1 and not job.stream
    s = job.sampling
    assert (s.temperature, s.top_p, s.max_tokens, s.seed, s.stop, s.logprobs) == (1.0, 1.0, 0, None, (), False)
    assert job.messages[0].role == "user" and job.messages[0].content == "hi"


def test_chat_fields_are_honoured():
    job = chat(temperature=0, top_p=0.5, max_tokens=7, seed=-1, stop="END", logprobs=True, top_logprobs=0,
               n=3, stream=True, stream_options={"include_usage": True}, service_tier="flex",
               prompt_cache_key="conv-1", user="u", metadata={"a": "b"})
    s = job.sampling
    assert (s.temperature, s.top_p, s.max_tokens, s.stop, s.logprobs) == (0.0, 0.5, 7, ("END",), True)
    assert s.seed == (1 << 64) - 1  # negative seeds wrap, deterministically
    assert job.n == 3 and job.stream and job.include_usage
    assert job.priority == Priority.SHEDDABLE and job.session_id == "conv-1"
    assert chat(max_tokens=5, max_completion_tokens=9).sampling.max_tokens == 9


def test_chat_message_shapes():
    job = parse_chat({"model": "m", "messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}], "name": "x"},
        {"role": "assistant", "content": "ok"}]})
    assert [(m.role, m.content) for m in job.messages] == [("system", "be brief"), ("user", "ab"),
                                                          ("assistant", "ok")]


@pytest.mark.parametrize(("fields", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content[0]"),
    ({"model": ""}, "model"),
    ({"model": 5}, "model"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": MAX_CHOICES + 1}, "n"),
    ({"n": True}, "n"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"stop": ["a", 3]}, "stop"),
    ({"top_logprobs": 2, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 0}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"tools": [{"type": "function"}]}, "tools"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"service_tier": "gold"}, "service_tier"),
    ({"frobnicate": 1}, "frobnicate"),
])
def test_chat_refusals_name_the_field(fields, param):
    body = {"model": "m", "messages": USER, **fields}
    with pytest.raises(BadField) as err:
        parse_chat(body)
    assert err.value.param == param
    out = http_error(err.value)
    assert out.status == 400 and out.body["error"]["param"] == param
    assert out.body["error"]["type"] == "invalid_request_error" and out.body["error"]["message"]


def test_neutral_values_of_unsupported_features_are_accepted():
    chat(presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tools=[], tool_choice="none",
         response_format={"type": "text"}, parallel_tool_calls=False, store=False)


@pytest.mark.parametrize("body", [[], "x", None, 3])
def test_a_body_that_is_not_an_object_is_refused(body):
    with pytest.raises(BadField):
        parse_chat(body)


def test_completions():
    job = parse_completion({"model": "m", "prompt": ["a", "b"], "n": 2, "echo": True})
    assert job.prompts == ("a", "b") and job.choices == 4 and job.echo
    assert job.sampling.max_tokens == 16 and not job.sampling.logprobs  # OpenAI's completions default
    assert parse_completion({"model": "m", "prompt": "a", "logprobs": 0}).sampling.logprobs
    cases: list[tuple[dict[str, Any], str]] = [
        ({"prompt": [1, 2]}, "prompt"), ({"prompt": []}, "prompt"), ({}, "prompt"),
        ({"prompt": "a", "logprobs": 2}, "logprobs"), ({"prompt": "a", "suffix": "z"}, "suffix"),
        ({"prompt": "a", "best_of": 3}, "best_of"), ({"prompt": ["a"] * 9, "n": 2}, "n"),
        ({"prompt": "a", "echo": True, "logprobs": 0}, "echo")]
    for bad, param in cases:
        with pytest.raises(BadField) as err:
            parse_completion({"model": "m", **bad})
        assert err.value.param == param, bad


def test_requests_per_choice_with_seeds_and_priority():
    job = parse_completion({"model": "m", "prompt": ["p0", "p1"], "n": 2, "seed": 7, "temperature": 0.5,
                            "service_tier": "priority", "stop": ["x"], "prompt_cache_key": "s"})
    reqs = build_requests(job, "rid")
    assert [r.prompt for r in reqs] == ["p0", "p0", "p1", "p1"]
    assert [r.request_id for r in reqs] == ["rid-0", "rid-1", "rid-2", "rid-3"]
    assert [r.sampling.seed for r in reqs] == [7, 8, 7, 8]
    assert all(r.priority == common_pb2.PRIORITY_CRITICAL and r.session_id == "s" for r in reqs)
    assert list(reqs[0].sampling.stop) == ["x"] and reqs[0].sampling.max_tokens == 16
    single = build_requests(chat(temperature=0), "rid")
    assert len(single) == 1 and single[0].request_id == "rid" and not single[0].sampling.HasField("seed")
    assert single[0].messages[0].content == "hi" and single[0].priority == common_pb2.PRIORITY_UNSPECIFIED


def _chunk(text: str, ids: list[int], finish: int = 0, usage: tuple[int, int, int] | None = None,
           logprobs: list[float] | None = None) -> inference_pb2.GenerateResponse:
    out = inference_pb2.GenerateResponse(text=text, token_ids=ids, logprobs=logprobs or [])
    out.finish_reason = common_pb2.FinishReason.ValueType(finish)
    out.served_by.backend = "sim"
    out.served_by.simulated = True
    if usage:
        out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.cached_tokens = usage
    return out


def test_whole_chat_response_with_logprobs_and_usage():
    job = chat(logprobs=True, n=2)
    head = render.Header(id="chatcmpl-x", model="m", created=1)
    choices = [render.Choice(0), render.Choice(1)]
    for i in range(2):
        choices[i].add(_chunk("Hel", [1], logprobs=[-0.5]))
        choices[i].add(_chunk("lo!", [2, 3], common_pb2.FINISH_REASON_STOP, (10, 3, 8), [-0.1, -0.2]))
    out = render.chat_response(job, head, choices)
    assert out["object"] == "chat.completion" and out["id"] == "chatcmpl-x"
    c0 = out["choices"][0]
    assert c0["message"] == {"role": "assistant", "content": "Hello!", "refusal": None}
    assert c0["finish_reason"] == "stop"
    tokens = c0["logprobs"]["content"]
    assert [t["token"] for t in tokens] == ["Hel", "", "lo!"]  # joins to exactly the text
    assert [t["logprob"] for t in tokens] == pytest.approx([-0.5, -0.1, -0.2])
    assert tokens[0]["bytes"] == list(b"Hel")
    # n choices of one prompt: the prompt counts once, completions add up.
    assert out["usage"] == {"prompt_tokens": 10, "completion_tokens": 6, "total_tokens": 16,
                            "prompt_tokens_details": {"cached_tokens": 8}}


def test_completion_response_echo_and_text_offsets():
    job = parse_completion({"model": "m", "prompt": ["ab", "cd"], "logprobs": 0})
    choices = [render.Choice(0), render.Choice(1)]
    for c in choices:
        c.add(_chunk("x", [1], logprobs=[-1.0]))
        c.add(_chunk("yz", [2], common_pb2.FINISH_REASON_LENGTH, (2, 2, 0), [-2.0]))
    out = render.completion_response(job, render.Header(id="cmpl-x", model="m"), choices)
    assert out["choices"][1]["text"] == "xyz" and out["choices"][1]["finish_reason"] == "length"
    assert out["choices"][0]["logprobs"] == {"tokens": ["x", "yz"], "token_logprobs": [-1.0, -2.0],
                                             "top_logprobs": None, "text_offset": [0, 1]}
    assert out["usage"]["prompt_tokens"] == 4  # two prompts, each counted once
    echoed = render.Choice(0, prefix="ab")
    echoed.add(_chunk("c", [1]))
    assert echoed.text == "abc"


def test_stream_chunks():
    job = chat(stream=True, stream_options={"include_usage": True}, logprobs=True)
    head = render.Header(id="chatcmpl-x", model="m", created=1)
    first = render.chat_chunk(job, head, 0, _chunk("", [5], logprobs=[-1.0]), first=True)
    assert first["object"] == "chat.completion.chunk" and first["usage"] is None
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert first["choices"][0]["logprobs"]["content"][0]["token"] == ""
    last = render.chat_chunk(job, head, 0, _chunk("!", [6], common_pb2.FINISH_REASON_STOP, (1, 2, 0), [-1.0]),
                             first=False)
    assert last["choices"][0]["delta"] == {"content": "!"} and last["choices"][0]["finish_reason"] == "stop"
    choice = render.Choice(0)
    choice.usage = _chunk("", [], usage=(4, 2, 1))
    usage = render.usage_chunk(job, head, [choice])
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}
    assert "usage" not in render.chat_chunk(chat(stream=True), head, 0, _chunk("a", [1]), first=False)


@pytest.mark.parametrize(("err", "status", "type_", "code"), [
    (NotFound("model 'x' is not served"), 404, "invalid_request_error", "model_not_found"),
    (ResourceExhausted("shed", retry_after_ms=1500), 429, "rate_limit_error", "rate_limit_exceeded"),
    (Unavailable("no replica"), 503, "server_error", "service_unavailable"),
    (ServiceError.of(grpc.StatusCode.DEADLINE_EXCEEDED, "late"), 504, "server_error", "timeout"),
    (ServiceError.of(grpc.StatusCode.PERMISSION_DENIED, "no"), 403, "permission_error", None),
    (ServiceError("bug"), 500, "server_error", "internal_error"),
])
def test_mesh_errors_become_openai_errors(err, status, type_, code):
    out = http_error(err)
    assert out.status == status
    assert out.body == {"error": {"message": err.message, "type": type_, "code": code,
                                  "param": "model" if status == 404 else None}}
    if status == 429:
        assert out.headers == {"retry-after": "2", "retry-after-ms": "1500"}
    elif status == 503:
        assert out.headers["retry-after"] == "1"
    else:
        assert out.headers == {}


def test_forwarded_headers_and_request_ids():
    headers = [("Authorization", "Bearer k"), ("traceparent", "00-ab-cd-01"), ("X-Session-Id", "s1"),
               ("x-tenant", "acme"), ("x-envoy-expected-rq-timeout-ms", "5"), ("x-forwarded-for", "1.2.3.4"),
               ("content-type", "application/json"), ("cookie", "c"), ("x-bad", "caf\u00e9"),
               ("x-big", "v" * 5000), ("x-request-id", "abc-123")]
    assert forwarded_metadata(headers) == [("authorization", "Bearer k"), ("traceparent", "00-ab-cd-01"),
                                           ("x-session-id", "s1"), ("x-tenant", "acme"),
                                           ("x-request-id", "abc-123")]
    assert request_id(headers) == "abc-123"
    assert len(request_id([("x-request-id", "bad id with spaces")])) == 32
