"""Prefix scoring on what replicas really cache (KV events), where they publish events.

The router tokenizes the request with the model's own tokenizer (fetched once from a server,
tokens.py), computes the same canonical block keys as the engine (tenant salt
and public system prompt included) and looks them up in the KV index. A block in the replica's
own pool costs nothing; a block any replica put in the shared store costs a fetch, counted as
`SHARED_COST` of computing it. When any candidate has no event state or its tokenizer is not loaded
yet, the caller falls back to the text guess for all of them (one scale per decision).
"""

from __future__ import annotations

from collections.abc import Sequence

from services.cache import keys, runtime

from .kv_index import KvIndex
from .tokens import TokenizerCache
from .types import Endpoint, RouteRequest

#: Fetching a block from the shared store costs about this share of computing its prefill.
SHARED_COST = 0.1


def request_keys(req: RouteRequest, namespace: bytes, block_size: int, tokens: list[int], public: int) -> list[bytes]:
    """The request's block keys under one namespace (memoised on the request)."""
    memo = req.kv_keys
    got = memo.get(namespace)
    if got is None:
        n_blocks = (len(tokens) - 1) // block_size if tokens else 0
        got = memo[namespace] = keys.chain(namespace, tokens[:n_blocks * block_size], block_size,
                                           runtime.salt(req.tenant), public // block_size)
    return got


def cached_tokens(tier: Sequence[Endpoint], req: RouteRequest, index: KvIndex,
                  tokenizers: TokenizerCache) -> tuple[dict[str, float], int] | None:
    """(prefill tokens each replica would skip, prompt tokens), or None to use the text guess."""
    out: dict[str, float] = {}
    n_tokens = 0
    for e in tier:
        rc = index.get(e.replica_id)
        if rc is None:
            return None
        encoded = tokenizers.encode(rc.info.tokenizer_digest, req)
        if encoded is None:
            return None
        tokens, public = encoded
        n_tokens = len(tokens)
        ks = request_keys(req, rc.info.namespace, rc.info.block_size, tokens, public)
        local, shared = index.match(e.replica_id, ks)
        out[e.replica_id] = (local + (1 - SHARED_COST) * shared) * rc.info.block_size
    return out, n_tokens
