"""A local JWT issuer for the edge: an ES256 signing key, its JWKS (what Envoy's jwt_authn
checks tokens against) and tokens naming a tenant.

In a company the identity provider signs tokens and publishes its JWKS; this module stands in
for it on a development mesh (`meshctl jwt token`), and Envoy only ever sees the public JWKS
file. A token carries `iss`, `aud`, `exp`, `sub` and the `tenant` claim that Envoy copies into
`x-meshserve-jwt-tenant` once the signature, issuer, audience and expiry check out.
"""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

ISSUER = "meshserve-local"
AUDIENCE = "meshserve"
KEY_FILE = "jwt-signing.key"
JWKS_FILE = "jwks.json"
KEY_ID = "meshserve-local-1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def ensure_issuer(directory: Path) -> Path:
    """A signing key and its JWKS in `directory` (kept if present); returns the JWKS path."""
    key_path, jwks_path = directory / KEY_FILE, directory / JWKS_FILE
    if not key_path.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                        serialization.NoEncryption()))
    key = _load(key_path)
    numbers = key.public_key().public_numbers()
    jwks = {"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": KEY_ID,
                      "x": _b64(numbers.x.to_bytes(32, "big")), "y": _b64(numbers.y.to_bytes(32, "big"))}]}
    jwks_path.write_text(json.dumps(jwks))
    return jwks_path


def _load(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC key")
    return key


def token(directory: Path, tenant: str, ttl_s: int = 3600, subject: str = "",
          now: float | None = None, key_path: Path | None = None) -> str:
    """A signed token for `tenant` (ES256)."""
    issued = int(time.time() if now is None else now)
    header = {"alg": "ES256", "typ": "JWT", "kid": KEY_ID}
    claims = {"iss": ISSUER, "aud": AUDIENCE, "iat": issued, "exp": issued + ttl_s,
              "sub": subject or tenant, "tenant": tenant}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    der = _load(key_path or directory / KEY_FILE).sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"
