"""Job and batch records: ids, limits, states and the checks on what clients send.

Plain functions over the protobuf records (the records are what JetStream stores); the API, the
workers and the tests share them, so a limit or a state rule lives in one place.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from typing import cast

from meshserve.v1 import jobs_pb2

from services.common.errors import InvalidArgument

MIN_WINDOW_S = 60
MAX_WINDOW_S = 7 * 24 * 3600
DEFAULT_WINDOW_S = 24 * 3600
MIN_RETENTION_S = 3600
MAX_RETENTION_S = 30 * 24 * 3600
DEFAULT_RETENTION_S = 7 * 24 * 3600
MAX_IDEMPOTENCY_KEY = 256
MAX_METADATA = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
#: Batch input limits (as the OpenAI Batch API's).
MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_FILE_LINES = 50_000
ENDPOINT = "/v1/generate"

JOB_FINAL = frozenset({jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED,
                       jobs_pb2.JOB_STATE_EXPIRED})
BATCH_FINAL = frozenset({jobs_pb2.BATCH_STATUS_COMPLETED, jobs_pb2.BATCH_STATUS_FAILED,
                         jobs_pb2.BATCH_STATUS_EXPIRED, jobs_pb2.BATCH_STATUS_CANCELLED})
BANDS: dict[int, str] = {jobs_pb2.JOB_PRIORITY_HIGH: "high", jobs_pb2.JOB_PRIORITY_NORMAL: "normal",
                         jobs_pb2.JOB_PRIORITY_LOW: "low"}
BAND_ORDER = ("high", "normal", "low")

_ID = re.compile(r"(job|batch|file)-[0-9a-f]{12}[0-9a-f]{12}")
_WINDOW = re.compile(r"(\d{1,6})([mhd])")


def now_ms() -> int:
    return int(time.time() * 1000)


def new_id(kind: str) -> str:
    """Time-ordered ids (newest sort last): 12 hex digits of milliseconds, 12 random."""
    return f"{kind}-{now_ms():012x}{os.urandom(6).hex()}"


def check_id(kind: str, value: str) -> str:
    if not value:
        raise InvalidArgument(f"{kind}_id is required")
    if len(value) > 64 or not _ID.fullmatch(value) or not value.startswith(kind + "-"):
        raise InvalidArgument(f"{kind}_id {value[:64]!r} is not a {kind} id (like {kind}-0190a1b2c3d4e5f6a7b8c9d0)")
    return value


def band(priority: int) -> str:
    if priority == jobs_pb2.JOB_PRIORITY_UNSPECIFIED:
        return "normal"
    if priority not in BANDS:
        raise InvalidArgument(f"unknown job priority {priority}; use HIGH, NORMAL or LOW")
    return BANDS[priority]


def resolved_priority(priority: int) -> jobs_pb2.JobPriority:
    band(priority)
    return cast(jobs_pb2.JobPriority, priority or jobs_pb2.JOB_PRIORITY_NORMAL)


def window_s(seconds: int) -> int:
    if seconds == 0:
        return DEFAULT_WINDOW_S
    if not MIN_WINDOW_S <= seconds <= MAX_WINDOW_S:
        raise InvalidArgument(f"completion_window_s must be {MIN_WINDOW_S} s to {MAX_WINDOW_S} s (7 d), got {seconds}")
    return seconds


def parse_window(text: str) -> int:
    """OpenAI-style "24h" (also "90m", "2d") in seconds."""
    if not text:
        return DEFAULT_WINDOW_S
    m = _WINDOW.fullmatch(text.strip())
    if not m:
        raise InvalidArgument(f"completion_window {text[:32]!r} must look like 24h, 90m or 2d")
    return window_s(int(m.group(1)) * {"m": 60, "h": 3600, "d": 86400}[m.group(2)])


def retention_s(seconds: int) -> int:
    if seconds == 0:
        return DEFAULT_RETENTION_S
    if not MIN_RETENTION_S <= seconds <= MAX_RETENTION_S:
        raise InvalidArgument(f"retention_s must be {MIN_RETENTION_S} s (1 h) to {MAX_RETENTION_S} s (30 d), "
                              f"got {seconds}")
    return seconds


def check_metadata(metadata: dict[str, str]) -> dict[str, str]:
    if len(metadata) > MAX_METADATA:
        raise InvalidArgument(f"at most {MAX_METADATA} metadata entries, got {len(metadata)}")
    for k, v in metadata.items():
        if not k or len(k) > MAX_METADATA_KEY:
            raise InvalidArgument(f"metadata keys must be 1-{MAX_METADATA_KEY} characters, got {k[:80]!r}")
        if len(v) > MAX_METADATA_VALUE:
            raise InvalidArgument(f"metadata[{k!r}] is {len(v)} characters; the limit is {MAX_METADATA_VALUE}")
    return dict(metadata)


def check_idempotency_key(key: str) -> str:
    if len(key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidArgument(f"idempotency_key is {len(key)} characters; the limit is {MAX_IDEMPOTENCY_KEY}")
    if key and not (key.isascii() and key.isprintable()):
        raise InvalidArgument("idempotency_key must be printable ASCII")
    return key


def page_size(n: int) -> int:
    if n < 0 or n > MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be 0-{MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE}), got {n}")
    return n or DEFAULT_PAGE_SIZE


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def key_digest(text: str) -> str:
    """A store key for a client string (idempotency keys may hold characters keys cannot)."""
    return hashlib.sha256(text.encode()).hexdigest()[:40]


def model_token(model: str) -> str:
    """A subject token and consumer-name part for a model (model names may contain '.')."""
    return hashlib.blake2b(model.encode(), digest_size=12).hexdigest()


def state_name(state: int) -> str:
    return jobs_pb2.JobState.Name(state).removeprefix("JOB_STATE_")


def batch_status_name(status: int) -> str:
    return jobs_pb2.BatchStatus.Name(status).removeprefix("BATCH_STATUS_").lower()


def owned_by(owner: str, tenant: str | None) -> bool:
    """Whether a record whose owner is `owner` is visible to a caller of `tenant` (None: a caller
    inside the mesh, who sees every record). Records of other tenants are answered as missing, so
    ids cannot be probed across tenants."""
    return tenant is None or owner == tenant
