"""Batch files: reading one input line, writing one output or error line (OpenAI Batch shapes).

Input line: {"custom_id": "...", "method": "POST", "url": "/v1/generate", "body": {GenerateRequest
as JSON, as POST /v1/generate takes it}}. A line that breaks any rule becomes an entry of the
batch's error file (its code and reason), never a failure of the whole batch.
Output line: {"id", "custom_id", "response": {"status_code": 200, "request_id", "body": GenerateResponse
as JSON}, "error": null}; error line: {"id", "custom_id", "response": null, "error": {"code",
"message", "line"}}.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf import json_format
from meshserve.v1 import inference_pb2, jobs_pb2

from services.common.errors import ServiceError
from services.common.validation import validate_request

from .records import ENDPOINT

MAX_CUSTOM_ID = 256


@dataclass
class Line:
    index: int  # 0-based line number in the file (blank lines keep their number)
    custom_id: str
    request: inference_pb2.GenerateRequest | None
    error_code: str = ""
    error_message: str = ""


def _fail(index: int, custom_id: str, code: str, message: str) -> Line:
    return Line(index, custom_id, None, code, message)


def parse_line(index: int, raw: bytes, known_models: Callable[[], frozenset[str]]) -> Line:
    """One input line, checked as far as the API would check the same request."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return _fail(index, "", "invalid_json", f"line {index + 1} is not JSON: {str(exc)[:200]}")
    if not isinstance(obj, dict):
        return _fail(index, "", "invalid_line", f"line {index + 1} is not a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
        return _fail(index, "", "invalid_custom_id",
                     f"line {index + 1}: custom_id must be a string of 1-{MAX_CUSTOM_ID} characters")
    if obj.get("method", "POST") != "POST":
        return _fail(index, custom_id, "invalid_method", f"line {index + 1}: method must be POST")
    if obj.get("url", ENDPOINT) != ENDPOINT:
        return _fail(index, custom_id, "invalid_url", f"line {index + 1}: url must be {ENDPOINT}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return _fail(index, custom_id, "invalid_body", f"line {index + 1}: body must be a JSON object")
    request = inference_pb2.GenerateRequest()
    try:
        json_format.ParseDict(body, request)
    except json_format.ParseError as exc:
        return _fail(index, custom_id, "invalid_body", f"line {index + 1}: {str(exc)[:300]}")
    try:
        valid = validate_request(request)
    except ServiceError as exc:
        return _fail(index, custom_id, exc.code.name, f"line {index + 1}: {exc.message}")
    if valid.resume_token_ids:
        return _fail(index, custom_id, "INVALID_ARGUMENT", f"line {index + 1}: resume_token_ids cannot be given")
    if valid.model not in known_models():
        return _fail(index, custom_id, "NOT_FOUND", f"line {index + 1}: model {valid.model!r} is not served")
    return Line(index, custom_id, request)


def line_id(batch_id: str, index: int) -> str:
    return f"{batch_id}-{index}"


def output_line(batch_id: str, outcome: jobs_pb2.LineOutcome) -> bytes:
    rid = line_id(batch_id, outcome.line)
    if outcome.error_code:
        obj: dict = {"id": rid, "custom_id": outcome.custom_id, "response": None,
                     "error": {"code": outcome.error_code, "message": outcome.error_message, "line": outcome.line + 1}}
    else:
        body = json_format.MessageToDict(outcome.response, preserving_proto_field_name=True)
        obj = {"id": rid, "custom_id": outcome.custom_id,
               "response": {"status_code": 200, "request_id": outcome.response.request_id, "body": body},
               "error": None}
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
