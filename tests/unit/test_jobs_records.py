"""Job and batch rules without a store: limits, ids, windows, batch lines in and out, room for
background work."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from meshserve.v1 import jobs_pb2

from services.common.errors import InvalidArgument
from services.jobs import jsonl
from services.jobs import records as r
from services.jobs.capacity import free_slots
from services.router.policy.types import Load

MODELS = frozenset({"echo"})


def line(**fields) -> bytes:
    obj = {"custom_id": "a", "method": "POST", "url": "/v1/generate",
           "body": {"model": "echo", "prompt": "hi", "sampling": {"max_tokens": 2}}}
    obj.update(fields)
    return json.dumps(obj).encode()


def test_ids_are_time_ordered_and_checked():
    a, b = r.new_id("job"), r.new_id("job")
    assert r.check_id("job", a) == a and len(a) == 28
    assert a[4:16] <= b[4:16]  # the time part never goes back
    for bad in ("", "job-xyz", "batch-" + a[4:], a + "0", "job-../../etc"):
        with pytest.raises(InvalidArgument):
            r.check_id("job", bad)


def test_windows_retention_and_metadata_limits():
    assert r.window_s(0) == 24 * 3600 and r.parse_window("") == 24 * 3600
    assert r.parse_window("90m") == 5400 and r.parse_window("2d") == 172800
    assert r.retention_s(0) == 7 * 86400 and r.retention_s(3600) == 3600
    for bad in (59, 8 * 86400):
        with pytest.raises(InvalidArgument, match="completion_window_s"):
            r.window_s(bad)
    with pytest.raises(InvalidArgument, match="24h"):
        r.parse_window("soon")
    for bad in (60, 31 * 86400):
        with pytest.raises(InvalidArgument, match="retention_s"):
            r.retention_s(bad)
    with pytest.raises(InvalidArgument, match="at most 16"):
        r.check_metadata({str(i): "" for i in range(17)})
    with pytest.raises(InvalidArgument, match="printable"):
        r.check_idempotency_key("a\nb")
    with pytest.raises(InvalidArgument, match="priority"):
        r.band(9)
    assert r.band(0) == "normal" and r.resolved_priority(0) == jobs_pb2.JOB_PRIORITY_NORMAL


def test_model_tokens_are_subject_safe_and_distinct():
    a, b = r.model_token("llama.3-8b"), r.model_token("llama-3.8b")
    assert a != b and a.isalnum() and b.isalnum()


def test_a_good_line_becomes_a_request():
    parsed = jsonl.parse_line(3, line(custom_id="req-1"), lambda: MODELS)
    assert parsed.request is not None and parsed.custom_id == "req-1" and parsed.index == 3
    assert parsed.request.sampling.max_tokens == 2


@pytest.mark.parametrize(("raw", "code"), [
    (b"not json", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    (b"[1, 2]", "invalid_line"),
    (line(custom_id=""), "invalid_custom_id"),
    (line(custom_id=7), "invalid_custom_id"),
    (line(method="GET"), "invalid_method"),
    (line(url="/v1/chat/completions"), "invalid_url"),
    (line(body="text"), "invalid_body"),
    (line(body={"model": "echo", "prompt": "x", "bogus": 1}), "invalid_body"),
    (line(body={"model": "echo"}), "INVALID_ARGUMENT"),
    (line(body={"model": "echo", "prompt": "x", "sampling": {"temperature": -1}}), "INVALID_ARGUMENT"),
    (line(body={"model": "nope", "prompt": "x"}), "NOT_FOUND"),
])
def test_bad_lines_become_error_entries(raw, code):
    parsed = jsonl.parse_line(0, raw, lambda: MODELS)
    assert parsed.request is None and parsed.error_code == code and "line 1" in parsed.error_message


def test_output_and_error_lines_have_the_openai_shape():
    ok = jobs_pb2.LineOutcome(custom_id="a", line=4)
    ok.response.text, ok.response.request_id = "hello", "rid"
    out = json.loads(jsonl.output_line("batch-x", ok))
    assert out["id"] == "batch-x-4" and out["error"] is None
    assert out["response"]["status_code"] == 200 and out["response"]["body"]["text"] == "hello"
    bad = jobs_pb2.LineOutcome(custom_id="b", line=0, error_code="invalid_json", error_message="no")
    err = json.loads(jsonl.output_line("batch-x", bad))
    assert err["response"] is None and err["error"] == {"code": "invalid_json", "message": "no", "line": 1}


def replica(in_flight: int, max_running: int, ejected: bool = False, queued: int = 0):
    return SimpleNamespace(load=lambda: Load(in_flight=in_flight, max_running=max_running, queue_depth=queued),
                           ejected=lambda now: ejected)


def test_background_work_leaves_room_for_interactive_traffic():
    assert free_slots([replica(0, 8)], fill=0.5) == 4
    assert free_slots([replica(3, 8), replica(4, 8)], fill=0.5) == 1
    assert free_slots([replica(6, 8)], fill=0.5) == 0  # past the fill line: nothing taken
    assert free_slots([replica(0, 8, ejected=True)], fill=1.0) == 0
    assert free_slots([replica(0, 0)], fill=0.5) == 1  # not reported yet: one at a time
    assert free_slots([], fill=1.0) == 0
    assert free_slots([replica(2, 8, queued=1), replica(1, 8)], fill=0.5) == 3  # a queue: that one offers none
