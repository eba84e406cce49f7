"""mTLS on every internal hop of a real secure mesh (etcd, control plane, model server, router,
Envoy upstream): a request through the edge still works, while plaintext, a client certificate
from another CA and an expired one are refused on every port; a certificate replaced on disk is
served without a restart; etcd's auth keeps each component to its own keys."""

from __future__ import annotations

import datetime
import json
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aetcd.exceptions
import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve.v1 import inference_pb2_grpc, modelserver_pb2, modelserver_pb2_grpc

from services.cli.inference_client import credentials
from services.cli.up import demo_key
from services.common import certs, grpc_util, keyspace
from services.common.etcd_client import EtcdClient
from services.common.tls import TlsFiles
from services.localmesh import components as c
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import REPO, ask, meshctl, running_mesh, sim_text, wait_for


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("secure-mesh"), base_port=0, secure=True,
                    lease_ttl=3, servers=[ServerPlan("server-0", ["echo=sim"])])
    with running_mesh(plan) as m:
        yield m


@pytest.fixture(scope="module")
def intruders(mesh: LocalMesh, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TlsFiles]:
    """Client identities that must be refused: signed by another CA, and expired (our CA)."""
    other = tmp_path_factory.mktemp("other-ca")
    certs.init_ca(other)
    certs.issue(other, "operator", "intruder")
    long_ago = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=30)
    certs.issue(mesh.certs_dir, "operator", "expired", days=1, not_before=long_ago)
    ca = mesh.certs_dir / certs.CA_CERT
    return {"other CA": TlsFiles(ca, other / "intruder.crt", other / "intruder.key"),
            "expired": TlsFiles(ca, mesh.certs_dir / "expired.crt", mesh.certs_dir / "expired.key")}


def grpc_ports(mesh: LocalMesh) -> dict[str, str]:
    return {"controlplane": mesh.controlplane, "router": mesh.routers[0],
            "model server": mesh.servers["server-0"]}


def health(address: str, tls: TlsFiles | None) -> bool:
    with grpc_util.channel(address, options=[], tls=tls) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return reply.status == health_pb2.HealthCheckResponse.SERVING


def served_certificate(address: str, tls: TlsFiles) -> bytes:
    """The DER certificate a listener presents to a new TLS handshake."""
    host, _, port = address.rpartition(":")
    ctx = ssl.create_default_context(cafile=str(tls.ca))
    ctx.load_cert_chain(str(tls.cert), str(tls.key))
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, int(port)), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=host) as conn:
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return der


@pytest.fixture(scope="module")
def api_key(mesh: LocalMesh) -> str:
    return demo_key(mesh)


def test_requests_cross_every_hop_over_mtls(mesh: LocalMesh, api_key: str) -> None:
    with grpc.insecure_channel(mesh.envoy) as ch:  # the public edge stays as configured
        answer = inference_pb2_grpc.InferenceServiceStub(ch).Generate(
            ask("alpha beta", 3), timeout=30, metadata=credentials(api_key))
    assert answer.text == sim_text("alpha beta", 3)
    assert answer.served_by.router_id == "router0" and answer.served_by.server_id == "server-0"


def test_meshctl_needs_the_operator_certificate(mesh: LocalMesh) -> None:
    ok = meshctl("--controlplane", mesh.controlplane, "status", certs=mesh.certs_dir)
    assert ok.returncode == 0, ok.stderr
    assert "server-0" in ok.stdout and "unhealthy" not in ok.stdout.lower(), ok.stdout
    plain = meshctl("--controlplane", mesh.controlplane, "--timeout", "3", "servers")
    assert plain.returncode == 3, plain.stdout + plain.stderr


@pytest.mark.parametrize("port", ["controlplane", "router", "model server"])
def test_grpc_ports_refuse_plaintext_foreign_and_expired_clients(
        mesh: LocalMesh, intruders: dict[str, TlsFiles], port: str) -> None:
    address = grpc_ports(mesh)[port]
    assert health(address, mesh.client_tls)
    for label, tls in [("plaintext", None), *intruders.items()]:
        with pytest.raises(grpc.RpcError) as err:
            health(address, tls)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, f"{port} with {label}"


def test_etcd_refuses_plaintext_foreign_and_expired_clients(
        mesh: LocalMesh, intruders: dict[str, TlsFiles]) -> None:
    client = mesh.etcd_clients[0]
    assert c.etcd_healthy(client, tls=mesh.client_tls)
    with pytest.raises(OSError):
        c.etcd_healthy(client)
    for label, tls in intruders.items():
        with pytest.raises(OSError):
            c.etcd_healthy(client, tls=tls)
            pytest.fail(f"etcd accepted a client with a certificate from {label}")
    with pytest.raises(OSError):  # the peer port speaks TLS only too
        c.etcd_healthy(mesh.etcd_peers[0])


def test_a_rotated_certificate_is_served_without_a_restart(mesh: LocalMesh, api_key: str) -> None:
    router = mesh.routers[0]
    before = served_certificate(router, mesh.client_tls)  # type: ignore[arg-type]
    pid = mesh.children["router0"].pid
    certs.issue(mesh.certs_dir, "router", "router0")
    fresh = ssl.PEM_cert_to_DER_cert((mesh.certs_dir / "router0.crt").read_text())
    assert fresh != before
    wait_for(lambda: served_certificate(router, mesh.client_tls) == fresh,  # type: ignore[arg-type]
             timeout=15, what="the router to serve its new certificate")
    assert mesh.children["router0"].pid == pid and mesh.children["router0"].alive()
    test_requests_cross_every_hop_over_mtls(mesh, api_key)


def test_a_service_without_tls_or_insecure_dev_refuses_to_start(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "services.cli.meshserve", "router", "--id", "r",
                           "--listen", "127.0.0.1:0", "--etcd", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60, cwd=REPO,
                          env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert done.returncode != 0
    assert "--tls-dir" in done.stdout + done.stderr


async def test_etcd_auth_confines_each_component_to_its_keys(mesh: LocalMesh) -> None:
    """etcd takes each certificate's CN as the user: a model server writes only its own keys."""
    async def put(identity: str, key: str) -> bool:
        client = EtcdClient(mesh.etcd_endpoints, tls=mesh.tls(identity))
        try:
            await client.put(key, b"x")
            return True
        except aetcd.exceptions.ClientError as exc:
            assert "permission denied" in str(exc).lower(), exc
            return False
        finally:
            await client.close()

    assert not await put("server-0", keyspace.server_key("server-1"))
    assert not await put("server-0", keyspace.status_key("server-1", "echo"))
    assert not await put("server-0", keyspace.model_key("echo"))
    assert not await put("router0", keyspace.model_key("echo"))
    assert not await put("supervisor", keyspace.drain_key("server-0"))
    assert await put("server-0", keyspace.status_key("server-0", "scratch"))
    assert await put("controlplane0", keyspace.status_key("server-0", "scratch"))
    client = EtcdClient(mesh.etcd_endpoints, tls=mesh.tls("controlplane0"))
    try:
        await client.delete(keyspace.status_key("server-0", "scratch"))
    finally:
        await client.close()


def envoy_serials(mesh: LocalMesh) -> set[int]:
    """Serial numbers of the certificates Envoy holds now (its admin /certs, in hex)."""
    with urllib.request.urlopen(f"http://{mesh.envoy_admin}/certs", timeout=5) as resp:
        data = json.loads(resp.read())
    return {int(c["serial_number"], 16) for entry in data.get("certificates", [])
            for c in entry.get("cert_chain", []) if c.get("serial_number")}


def test_envoy_takes_a_rotated_certificate_without_a_restart(mesh: LocalMesh, api_key: str) -> None:
    pid = mesh.children["envoy"].pid
    certs.issue(mesh.certs_dir, "envoy", "envoy")
    fresh = x509.load_pem_x509_certificate((mesh.certs_dir / "envoy.crt").read_bytes())
    wait_for(lambda: fresh.serial_number in envoy_serials(mesh), timeout=15,
             what="Envoy to load its new certificate")
    assert mesh.children["envoy"].pid == pid and mesh.children["envoy"].alive()
    test_requests_cross_every_hop_over_mtls(mesh, api_key)


def test_only_routers_the_control_plane_and_tools_call_model_servers(mesh: LocalMesh) -> None:
    request = modelserver_pb2.ModelServerServiceGenerateRequest(model="echo", prompt="a b")
    request.sampling.max_tokens = 1
    for identity, allowed in [("router0", True), ("envoy", False), ("operator", False)]:
        with grpc_util.channel(mesh.servers["server-0"], options=[], tls=mesh.tls(identity)) as ch:
            stub = modelserver_pb2_grpc.ModelServerServiceStub(ch)
            if allowed:
                assert [c.text for c in stub.Generate(request, timeout=10)]
                continue
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Generate(request, timeout=10))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED, identity
