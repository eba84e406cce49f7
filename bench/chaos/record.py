"""What the load generator observed of one request: timing, where each part was served, the
tokens received, how it ended. Kept small per chunk (a segment per change of server or router)
so thousands of 300-token streams fit in memory."""

from __future__ import annotations

from dataclasses import dataclass, field

from meshserve.v1 import common_pb2

from .answers import Expected, TokenCheck, check_tokens

LENGTH = common_pb2.FINISH_REASON_LENGTH


@dataclass
class Segment:
    """A run of chunks from one server through one router, from its first chunk."""

    at: float  # monotonic time of the segment's first chunk
    server: str
    router: str
    first_token: int  # index of its first token in the answer


@dataclass
class Record:
    request_id: str
    kind: str  # "stream" or "unary"
    model: str
    expected: Expected
    started: float
    calls: int = 0  # GenerateStream / Generate calls made: 1 + the client's resumes
    first_at: float | None = None
    last_at: float | None = None
    ended_at: float | None = None
    max_gap: float = 0.0  # longest wait between consecutive chunks (or start and first chunk)
    segments: list[Segment] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text_parts: list[str] = field(default_factory=list)
    finish_reason: int = 0
    completion_tokens: int = 0
    error: tuple[str, str] | None = None  # (status code name, details)

    def add(self, now: float, text: str, token_ids: list[int], server: str, router: str,
            finish_reason: int, completion_tokens: int) -> None:
        self.max_gap = max(self.max_gap, now - (self.last_at if self.last_at is not None else self.started))
        if self.first_at is None:
            self.first_at = now
        self.last_at = now
        if not self.segments or (self.segments[-1].server, self.segments[-1].router) != (server, router):
            self.segments.append(Segment(now, server, router, len(self.token_ids)))
        self.token_ids.extend(token_ids)
        self.text_parts.append(text)
        if finish_reason:
            self.finish_reason = finish_reason
            self.completion_tokens = completion_tokens

    def fail(self, now: float, code: str, details: str) -> None:
        self.error = (code, details)
        self.ended_at = now

    def finish(self, now: float) -> None:
        self.ended_at = now

    # --- judgement ------------------------------------------------------------------------

    @property
    def resumes(self) -> int:
        return max(0, self.calls - 1)

    @property
    def done(self) -> bool:
        """Ended with a final status: an error, or a last chunk with a finish reason."""
        return self.error is not None or (self.ended_at is not None and bool(self.finish_reason))

    @property
    def ttft(self) -> float | None:
        return None if self.first_at is None else self.first_at - self.started

    def check(self) -> TokenCheck:
        finished = self.error is None and bool(self.finish_reason)
        return check_tokens(self.expected, self.token_ids, "".join(self.text_parts), finished)

    def usage_ok(self) -> bool:
        """A finished answer ends with LENGTH and counts every token (resumed ones included)."""
        n = len(self.expected.token_ids)
        return self.finish_reason == LENGTH and self.completion_tokens == n

    def segment_at(self, t: float) -> Segment | None:
        """The segment streaming this answer at time t (None: not streaming then)."""
        if self.first_at is None or t < self.first_at or (self.ended_at is not None and t >= self.ended_at):
            return None
        current = None
        for s in self.segments:
            if s.at > t:
                break
            current = s
        return current

    def first_chunk_elsewhere(self, after: float, server: str) -> float | None:
        """When the first chunk from a server other than `server` arrived after time `after`."""
        return next((s.at for s in self.segments if s.at > after and s.server != server), None)
