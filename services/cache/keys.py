"""Canonical cache keys: the same bytes on every server, every process and every restart.

A KV block's key is SHA-256 over its parent's key, its token ids as fixed-width little-endian
uint32 and its salt; the chain starts at the model's namespace, itself SHA-256 over the weights
digest, dtype, block layout and size. So equal keys mean equal KV for the whole prefix, computed by
the same weights the same way, for the same tenant. Never Python's hash(): it is seeded per
process, which is how other systems ended up with zero cross-instance hits.

Tenant salts are HMAC-SHA-256(secret, tenant): without the deployment's secret a client cannot
compute another tenant's keys, and with it every server agrees. The public salt is the one salt
tenants share on purpose (a public system prompt they opt in to share).
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Sequence

KEY_BYTES = 32
#: Bumped when the key derivation changes; old entries then simply stop matching.
KEY_VERSION = b"meshserve-kv-key/1"
PUBLIC_SALT = hashlib.sha256(b"meshserve-public-salt/1").digest()
_MAX_TOKEN = (1 << 32) - 1


def _field(h: hashlib._Hash, value: bytes) -> None:
    """Length-prefixed, so no two field lists hash alike by shifting bytes between fields."""
    h.update(struct.pack("<I", len(value)))
    h.update(value)


def namespace(weights_digest: str, dtype: str, layout: str, block_size: int, numerics: str = "") -> bytes:
    """The root of every key chain of one model as one engine configuration computes it.

    `numerics` names options that change the KV values (int8 weights, batch-invariant GEMMs)."""
    h = hashlib.sha256()
    for part in (KEY_VERSION, weights_digest.encode(), dtype.encode(), layout.encode(),
                 str(block_size).encode(), numerics.encode()):
        _field(h, part)
    return h.digest()


def tenant_salt(tenant: str, secret: bytes = b"") -> bytes:
    """The salt of a tenant's keys ('' is the anonymous tenant, which has its own salt)."""
    return hmac.new(secret or b"meshserve-no-secret", b"tenant:" + tenant.encode(), hashlib.sha256).digest()


def token_bytes(tokens: Sequence[int]) -> bytes:
    if any(not 0 <= t <= _MAX_TOKEN for t in tokens):
        raise ValueError("token ids must fit in uint32")
    return struct.pack(f"<{len(tokens)}I", *tokens)


def block_key(parent: bytes, tokens: Sequence[int], salt: bytes) -> bytes:
    """Key of a full block: its parent's key (the namespace for the first block), tokens, salt."""
    h = hashlib.sha256()
    _field(h, parent)
    _field(h, token_bytes(tokens))
    _field(h, salt)
    return h.digest()


def chain(root: bytes, tokens: Sequence[int], block_size: int, salt: bytes, public_blocks: int = 0,
          start: int = 0, parent: bytes | None = None) -> list[bytes]:
    """Keys of the full blocks of `tokens` from block `start` (whose parent is `parent`, or the
    root when start is 0); the first `public_blocks` blocks take the public salt."""
    out: list[bytes] = []
    prev = root if start == 0 else parent
    if prev is None:
        raise ValueError("a chain that does not start at block 0 needs its parent key")
    for i in range(start, len(tokens) // block_size):
        prev = block_key(prev, tokens[i * block_size:(i + 1) * block_size],
                         PUBLIC_SALT if i < public_blocks else salt)
        out.append(prev)
    return out


def store_key(kind: str, ns: bytes, salt: bytes, key: bytes) -> str:
    """The store's name for an entry: kind, model namespace and salt as prefixes (so one model's
    or one tenant's entries can be flushed by pattern), then the key. Versioned by the kind."""
    return f"ms:{kind}:{ns[:8].hex()}:{salt[:8].hex()}:{key.hex()}"


def store_pattern(kind: str, ns: bytes | None = None, salt: bytes | None = None) -> str:
    return f"ms:{kind}:{ns[:8].hex() if ns else '*'}:{salt[:8].hex() if salt else '*'}:*"
