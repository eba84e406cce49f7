"""Tenants and API keys as plain values: checking records, making keys, and the key set routers
authenticate against.

A key a client sends is `msk_<key-id>_<secret>`: the id (12 hex characters) finds the record in
one lookup, the secret (32 random bytes, URL-safe base64) is stored only as its SHA-256. A slow
password hash is not needed: the secret is random with 256 bits, not a person's password, so a
stolen hash cannot be guessed back, and a fast hash keeps the edge check in microseconds.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, field

from meshserve.v1 import auth_pb2

from . import keyspace, names
from .errors import InvalidArgument

KEY_PREFIX = "msk_"
ALL_MODELS = "*"
_KEY = re.compile(r"msk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})")
MAX_MODELS = 256
MAX_RATE = 1e6


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def new_key(tenant: str, created_by: str, now_ms: int) -> tuple[auth_pb2.ApiKey, str]:
    """A fresh key record (hash only) and the whole key, which is shown once."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    record = auth_pb2.ApiKey(key_id=key_id, tenant=tenant, secret_sha256=hash_secret(secret),
                             created_unix_ms=now_ms, created_by=created_by)
    return record, f"{KEY_PREFIX}{key_id}_{secret}"


def parse_key(text: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    m = _KEY.fullmatch(text.strip())
    return (m.group(1), m.group(2)) if m else None


def key_from_headers(headers: dict[str, str]) -> str:
    """The key a request carries: `authorization: Bearer <key>` (what OpenAI clients send) or
    `x-api-key: <key>`; '' when none."""
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip()


def check_tenant(tenant: auth_pb2.Tenant) -> auth_pb2.Tenant:
    """The tenant if its name and models follow the rules, else InvalidArgument naming them."""
    names.check_name("tenant name", tenant.name)
    if not tenant.models:
        raise InvalidArgument(f"tenant {tenant.name}: list the models it may call ('*' for all)")
    if len(tenant.models) > MAX_MODELS:
        raise InvalidArgument(f"tenant {tenant.name}: at most {MAX_MODELS} models")
    for model in tenant.models:
        if model != ALL_MODELS:
            names.check_model_name(model)
    if not 0 <= tenant.requests_per_second <= MAX_RATE:  # also refuses NaN
        raise InvalidArgument(f"tenant {tenant.name}: requests_per_second must be in [0, {MAX_RATE:g}] "
                              "(0 = unlimited)")
    if not 0 <= tenant.tokens_per_minute <= MAX_RATE * 60_000:
        raise InvalidArgument(f"tenant {tenant.name}: tokens_per_minute must be >= 0 (0 = unlimited)")
    return tenant


@dataclass
class KeySet:
    """What a router knows of tenants and keys, fed from its etcd mirror of /meshserve/auth/.
    Records that do not parse or break the rules are left out (and so authenticate nobody)."""

    keys: dict[str, auth_pb2.ApiKey] = field(default_factory=dict)
    tenants: dict[str, auth_pb2.Tenant] = field(default_factory=dict)

    def apply(self, key: str, value: bytes | None) -> None:
        if key.startswith(keyspace.API_KEYS):
            ident = key.removeprefix(keyspace.API_KEYS)
            record = keyspace.decode(auth_pb2.ApiKey, value) if value is not None else None
            if record is None or record.key_id != ident or len(record.secret_sha256) != 32:
                self.keys.pop(ident, None)
            else:
                self.keys[ident] = record
        elif key.startswith(keyspace.TENANTS):
            name = key.removeprefix(keyspace.TENANTS)
            tenant = keyspace.decode(auth_pb2.Tenant, value) if value is not None else None
            try:
                ok = tenant is not None and tenant.name == name and check_tenant(tenant) is tenant
            except InvalidArgument:
                ok = False
            if ok and tenant is not None:
                self.tenants[name] = tenant
            else:
                self.tenants.pop(name, None)

    def authenticate(self, presented: str) -> str | None:
        """The tenant a key belongs to, or None (malformed, unknown, revoked, wrong secret, or a
        tenant that no longer exists)."""
        parsed = parse_key(presented)
        if parsed is None:
            return None
        record = self.keys.get(parsed[0])
        if record is None or record.revoked:
            return None
        if not hmac.compare_digest(record.secret_sha256, hash_secret(parsed[1])):
            return None
        return record.tenant if record.tenant in self.tenants else None

    def may_call(self, tenant: str, model: str) -> bool:
        """Whether `tenant` may call `model` (a deployment, a version or a policy name; a
        version is allowed when its base name is)."""
        record = self.tenants.get(tenant)
        if record is None:
            return False
        allowed = set(record.models)
        return ALL_MODELS in allowed or model in allowed or model.partition("@")[0] in allowed
