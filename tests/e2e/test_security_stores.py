"""mTLS on the store hops of a real secure mesh: a 3-node JetStream cluster (client and route
ports) and the shared cache's redis-server accept only clients with a certificate from the mesh
CA; a plaintext client and one holding a certificate from another CA are refused, while the
mesh's own router and job worker are connected (over TLS, the only way in)."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator

import nats
import pytest
import redis

from services.cache.store import connect as redis_client
from services.common import certs
from services.common.tls import TlsFiles, client_ssl_context
from services.localmesh import cache_store as cs
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import running_mesh, wait_for


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("secure-stores"), base_port=0, secure=True,
                    lease_ttl=3, servers=[ServerPlan("server-0", ["echo=sim"])],
                    jetstream_nodes=3, job_workers=1, cache_store_bytes=64 * 1024 * 1024)
    with running_mesh(plan) as m:
        yield m


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, mesh: LocalMesh) -> TlsFiles:
    """A well-formed client certificate from another CA, trusting the mesh CA (so only the
    server's check of the client certificate can refuse it)."""
    other = tmp_path_factory.mktemp("other-ca")
    certs.init_ca(other)
    certs.issue(other, "client", "intruder")
    return TlsFiles(mesh.certs_dir / certs.CA_CERT, other / "intruder.crt", other / "intruder.key")


def monitor(mesh: LocalMesh, i: int, path: str) -> dict:
    node = mesh.nats[i]
    with urllib.request.urlopen(f"http://{node.host}:{node.monitor_port}/{path}", timeout=5) as resp:
        return json.loads(resp.read())


def plaintext_nats_answers(url: str) -> bool:
    """Speak the NATS protocol without TLS: True when the server answers PING with PONG."""
    host, _, port = url.removeprefix("nats://").rpartition(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.settimeout(5)
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false}\r\nPING\r\n')
        try:
            reply = sock.recv(4096)
        except OSError:
            return False
    return b"PONG" in reply


async def nats_ping(url: str, tls: TlsFiles | None) -> None:
    nc = await nats.connect([url], tls=client_ssl_context(tls) if tls else None, connect_timeout=3,
                            allow_reconnect=False, max_reconnect_attempts=0)
    try:
        await nc.flush(timeout=3)
    finally:
        await nc.close()


def test_jetstream_routes_and_mesh_clients_run_over_tls(mesh: LocalMesh) -> None:
    for i in range(3):  # every node sees both others over its TLS route
        wait_for(lambda i=i: monitor(mesh, i, "routez")["num_routes"] >= 2, 30,  # type: ignore[misc]
                 what=f"nats{i} to route to its peers over TLS")
    names = {conn.get("name") for i in range(3) for conn in monitor(mesh, i, "connz")["connections"]}
    assert {"router0", "jobworker0"} <= names, names
    assert all(monitor(mesh, i, "varz")["tls_required"] for i in range(3))


async def test_jetstream_refuses_plaintext_and_foreign_clients(mesh: LocalMesh, foreign: TlsFiles) -> None:
    url = mesh.nats[0].url
    await nats_ping(url, mesh.client_tls)
    assert not plaintext_nats_answers(url)
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises the handshake's own error
        await nats_ping(url, foreign)


def test_cache_store_refuses_plaintext_and_foreign_clients(mesh: LocalMesh, foreign: TlsFiles) -> None:
    secure_url = cs.redis_url(mesh.cache_store, secure=True)
    good = redis_client(secure_url, 3.0, mesh.client_tls, max_connections=2)
    assert good.ping() and good.set("probe", b"1") and good.get("probe") == b"1"
    good.close()
    for label, client in [("plaintext", redis.Redis.from_url(cs.redis_url(mesh.cache_store), socket_timeout=3,
                                                             socket_connect_timeout=3)),
                          ("other CA", redis_client(secure_url, 3.0, foreign, max_connections=2))]:
        with pytest.raises(redis.exceptions.ConnectionError):
            client.ping()
            pytest.fail(f"the cache store answered a {label} client")
        client.close()
