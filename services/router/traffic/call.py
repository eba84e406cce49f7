"""What one client call brings to traffic policy besides its request, and the chunk stream type."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field

from meshserve.v1 import inference_pb2

from services.common.validation import ValidRequest

Chunks = AsyncGenerator[inference_pb2.GenerateResponse, None]


@dataclass
class Call:
    metadata: Sequence[tuple[str, object]] | None
    deadline: float | None  # time.monotonic() by which the client wants its answer
    session: str = ""
    region: str = ""  # the request's region, else the router's
    _headers: dict[str, str] | None = field(default=None, repr=False)

    @property
    def headers(self) -> dict[str, str]:
        """Invocation metadata by lower-case name (the first value of a repeated one)."""
        if self._headers is None:
            self._headers = {}
            for k, v in self.metadata or ():
                self._headers.setdefault(k.lower(), v.decode(errors="replace") if isinstance(v, bytes) else str(v))
        return self._headers


def prompt_text(req: ValidRequest) -> str:
    """The text rules look at: the prompt, or the messages' contents joined by newlines."""
    return req.prompt if req.prompt is not None else "\n".join(m.content for m in req.messages or ())
