"""Process-wide cache settings: the shared store and the tenant-salt secret.

The model server process sets them once at start (`--cache-store`, MESHSERVE_CACHE_SECRET);
engines read them when they load. Kept out of every engine's constructor on purpose: the store is
infrastructure of the server, not an option of one deployment.
"""

from __future__ import annotations

import logging
import os

from services.common import grpc_util

from . import metrics
from .keys import tenant_salt
from .store import Store

log = logging.getLogger(__name__)

SECRET_ENV = "MESHSERVE_CACHE_SECRET"

_store: Store | None = None
_secret: bytes = b""


def configure(store_url: str = "", secret: str | None = None) -> Store | None:
    """Set (or with '' clear) the shared store; the secret defaults to $MESHSERVE_CACHE_SECRET."""
    global _store, _secret
    if _store is not None:
        _store.close()
    # a rediss:// store gets this process's mesh certificate (the store requires one)
    tls = grpc_util.current_tls() if store_url.startswith("rediss://") else None
    _store = Store(store_url, tls=tls) if store_url else None
    _secret = (secret if secret is not None else os.environ.get(SECRET_ENV, "")).encode()
    if _store is None:
        metrics.STORE_UP.set(0)
    else:
        log.info("shared cache store: %s", store_url)
    return _store


def store() -> Store | None:
    return _store


def salt(tenant: str) -> bytes:
    return tenant_salt(tenant, _secret)
