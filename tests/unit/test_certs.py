"""The local CA: identities in certificates, re-issue near expiry, and who a peer is."""

from __future__ import annotations

import datetime
from pathlib import Path

import pytest
from cryptography import x509

from services.common import certs
from services.common.tls import TlsFiles, identities


def test_issued_certificates_carry_a_spiffe_identity_signed_by_the_ca(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    path = certs.issue(tmp_path, "router", "router0")
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    ca = x509.load_pem_x509_certificate((tmp_path / certs.CA_CERT).read_bytes())
    cert.verify_directly_issued_by(ca)
    assert certs.describe(path)["identity"] == "spiffe://meshserve.local/router/router0"
    assert (tmp_path / "router0.key").stat().st_mode & 0o077 == 0  # the key is private


def test_init_keeps_an_existing_ca(tmp_path: Path) -> None:
    first = certs.init_ca(tmp_path).read_bytes()
    assert certs.init_ca(tmp_path).read_bytes() == first


def test_ensure_reissues_only_missing_or_expiring_certificates(tmp_path: Path) -> None:
    certs.init_ca(tmp_path)
    old = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=360)
    certs.issue(tmp_path, "server", "server-0", days=363, not_before=old)  # 3 days left
    certs.issue(tmp_path, "router", "router0")
    kept = (tmp_path / "router0.crt").read_bytes()
    certs.ensure(tmp_path, [("server", "server-0"), ("router", "router0"), ("envoy", "envoy")])
    assert not certs.needs_issue(tmp_path, "server-0")
    assert (tmp_path / "router0.crt").read_bytes() == kept
    assert TlsFiles.from_dir(tmp_path, "envoy").cert.exists()


@pytest.mark.parametrize("kind,name", [("nobody", "x"), ("router", "../etc"), ("router", "")])
def test_bad_kinds_and_names_are_refused(tmp_path: Path, kind: str, name: str) -> None:
    certs.init_ca(tmp_path)
    with pytest.raises(ValueError):
        certs.issue(tmp_path, kind, name)


def test_missing_files_name_the_command_that_makes_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="meshctl certs"):
        TlsFiles.from_dir(tmp_path, "router0")


def test_peer_identities_come_only_from_mesh_uris() -> None:
    ctx = {"x509_subject_alternative_name": [b"127.0.0.1", b"spiffe://meshserve.local/envoy/envoy",
                                             b"spiffe://elsewhere/envoy/envoy",
                                             b"spiffe://meshserve.local/root/x"]}
    assert [(i.kind, i.name) for i in identities(ctx)] == [("envoy", "envoy")]


def test_a_secure_mesh_data_dir_refuses_a_plaintext_start(tmp_path: Path) -> None:
    """etcd auth is on in such a data dir: plaintext services could write nothing."""
    from services.localmesh.mesh import LocalMesh, MeshPlan
    from services.localmesh.processes import StartError

    (tmp_path / "etcd0" / "member").mkdir(parents=True)
    (tmp_path / "security-mode").write_text("mtls\n")
    with pytest.raises(StartError, match="secure mesh"):
        LocalMesh(MeshPlan(data_dir=tmp_path, servers=[], secure=False)).start()
