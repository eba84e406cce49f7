"""The mesh's local certificate authority: one CA, one certificate per component.

Every certificate carries a SPIFFE-style identity as its URI SAN
(`spiffe://meshserve.local/<kind>/<name>`, e.g. `.../router/router0`) and the name as its CN,
which etcd's client-certificate auth takes as the user name. Each certificate is good for both
sides of mTLS (serverAuth and clientAuth), so one file pair serves a process's listener and its
channels. Keys are ECDSA P-256: small, fast handshakes, supported by gRPC, Envoy and etcd alike.

Layout of a certificate directory: `ca.crt`, `ca.key`, and `<name>.crt` / `<name>.key` per
component. Files are written to a temporary name and renamed, so a process reloading its
certificate never reads half a file.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "meshserve.local"
CA_CERT = "ca.crt"
CA_KEY = "ca.key"
#: Component kinds a certificate can be issued for (the path segment of the SPIFFE id).
KINDS = ("etcd", "controlplane", "router", "server", "gateway", "jobworker", "envoy", "operator",
         "client", "store")
DEFAULT_DAYS = 365
#: A certificate closer than this to its end is issued again by `ensure`.
RENEW_BEFORE = datetime.timedelta(days=7)


def spiffe_id(kind: str, name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/{kind}/{name}"


@dataclass(frozen=True)
class Identity:
    """Who a peer certificate says it is (parsed from its URI SAN)."""

    kind: str
    name: str

    @classmethod
    def parse(cls, uri: str) -> Identity | None:
        prefix = f"spiffe://{TRUST_DOMAIN}/"
        if not uri.startswith(prefix):
            return None
        kind, _, name = uri.removeprefix(prefix).partition("/")
        if kind not in KINDS or not name or "/" in name:
            return None
        return cls(kind, name)


def _check_name(kind: str, name: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; one of {', '.join(KINDS)}")
    if not name or not all(ch.isalnum() or ch in "._-" for ch in name) or name.startswith("."):
        raise ValueError(f"certificate name {name!r}: letters, digits and ._- only")


def _write(path: Path, data: bytes, private: bool) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: Path, days: int = 3650) -> Path:
    """Create the CA in `directory` unless one is there; returns the CA certificate's path."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / CA_CERT
    if cert_path.exists() and (directory / CA_KEY).exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MeshServe"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "MeshServe local CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    _write(directory / CA_KEY, _key_pem(key), private=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), None)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"no CA in {directory}: run `meshctl certs init` first") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / CA_KEY} is not an EC key made by `meshctl certs init`")
    return cert, key


def issue(directory: Path, kind: str, name: str, *, days: float = DEFAULT_DAYS,
          hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
          not_before: datetime.datetime | None = None) -> Path:
    """Issue `<name>.crt`/`<name>.key` signed by the CA in `directory` (replacing any old pair).

    `hosts`: DNS names and IPs the holder serves on (checked by clients that dial it).
    `not_before`/`days` let tests make an expired certificate."""
    _check_name(kind, name)
    ca_cert, ca_key = _load_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    start = not_before or datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id(kind, name))]
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MeshServe"),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, kind),
                                     x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    _write(directory / f"{name}.key", _key_pem(key), private=True)
    cert_path = directory / f"{name}.crt"
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
    return cert_path


def needs_issue(directory: Path, name: str) -> bool:
    """True when `<name>` has no certificate, or one that ends within RENEW_BEFORE."""
    path = directory / f"{name}.crt"
    if not path.exists() or not (directory / f"{name}.key").exists():
        return True
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC) < RENEW_BEFORE


def ensure(directory: Path, components: list[tuple[str, str]]) -> None:
    """A CA and a current certificate for each (kind, name): what `meshserve up` runs."""
    init_ca(directory)
    for kind, name in components:
        if needs_issue(directory, name):
            issue(directory, kind, name)


def describe(path: Path) -> dict[str, str]:
    """What `meshctl certs list` shows for one certificate."""
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = sans.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return {"name": path.stem, "identity": ",".join(uris),
            "not_after": cert.not_valid_after_utc.isoformat(timespec="seconds")}
