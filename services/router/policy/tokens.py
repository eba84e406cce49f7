"""Model tokenizers on the router, fetched from model servers (GetTokenizer) by digest.

Loading happens in the background the first time a replica's KV events name a digest; until it is
loaded, requests are scored by the text guess. A fetch that fails is retried on the next event
after a back-off. Encodings are memoised on the request (one tokenization per request and
tokenizer, whatever the number of candidates).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from meshserve.v1 import modelserver_pb2 as pb

from services.cache.prompt_tokens import PromptTokenizer, files_digest

from .types import RouteRequest

log = logging.getLogger(__name__)

RETRY_AFTER_S = 10.0


class TokenizerCache:
    def __init__(self) -> None:
        self._loaded: dict[str, PromptTokenizer] = {}
        self._failed_at: dict[str, float] = {}
        self._loading: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    def ensure(self, digest: str, fetch: Callable[[], Awaitable[pb.GetTokenizerResponse]]) -> None:
        if not digest or digest in self._loaded or digest in self._loading:
            return
        if time.monotonic() - self._failed_at.get(digest, -RETRY_AFTER_S) < RETRY_AFTER_S:
            return
        self._loading.add(digest)
        task = asyncio.get_running_loop().create_task(self._load(digest, fetch), name=f"tokenizer:{digest[:12]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _load(self, digest: str, fetch: Callable[[], Awaitable[pb.GetTokenizerResponse]]) -> None:
        try:
            resp = await fetch()
            files = dict(resp.files)
            if files_digest(files) != digest:
                raise ValueError("the tokenizer files do not match their digest")
            self._loaded[digest] = await asyncio.to_thread(PromptTokenizer.from_files, files)
            log.info("tokenizer %s loaded: prefix scoring on KV events", digest[:12])
        except Exception as e:  # noqa: BLE001 - routing falls back to the text guess meanwhile
            self._failed_at[digest] = time.monotonic()
            log.warning("could not load tokenizer %s (%s); scoring by the text guess", digest[:12], e)
        finally:
            self._loading.discard(digest)

    def encode(self, digest: str, req: RouteRequest) -> tuple[list[int], int] | None:
        """(token ids, tokens of the public system prompt) of the request, or None (not loaded, or
        the request does not tokenize)."""
        memo = req.token_memo
        if digest in memo:
            return memo[digest]
        tok = self._loaded.get(digest)
        if tok is None:
            return None
        try:
            ids = tok.encode(req.prompt, req.messages)
            public = tok.public_tokens(req.messages, ids) if req.share_system_prompt and req.messages else 0
            out: tuple[list[int], int] | None = (ids, public)
        except Exception:  # noqa: BLE001 - a template that rejects the request: the engine will say so
            out = None
        memo[digest] = out
        return out
