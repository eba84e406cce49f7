"""Edge authentication and authorisation on a real secure mesh: API keys checked by Envoy's
ext_authz against the routers' key set, the tenant header Envoy sets (a client-sent one never
counts), models per tenant, operator identity on the control plane, and the audit log."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from meshserve.v1 import inference_pb2_grpc

from services.common import jwt_local, keyspace
from services.common.etcd_client import EtcdClient
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, running_mesh, sim_text, wait_for


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("edge-auth-mesh"), base_port=0, secure=True,
                    lease_ttl=3, gateways=1, servers=[ServerPlan("server-0", ["echo=sim", "other=sim"])])
    with running_mesh(plan) as m:
        yield m


def operator(mesh: LocalMesh, *args: str, cert: str = "operator"):
    return meshctl("--controlplane", mesh.controlplane, *args, certs=mesh.certs_dir, cert_name=cert)


@pytest.fixture(scope="module")
def keys(mesh: LocalMesh) -> dict[str, str]:
    """Tenant alpha may call echo only; tenant wide may call everything."""
    out = {}
    for tenant, models in [("alpha", ["--model", "echo"]), ("wide", [])]:
        done = operator(mesh, "tenants", "create", tenant, *models)
        assert done.returncode == 0, done.stderr
        made = operator(mesh, "keys", "create", tenant)
        assert made.returncode == 0, made.stderr
        out[tenant] = made.stdout.strip()
    return out


def call(mesh: LocalMesh, model: str, key: str = "", extra: tuple = ()) -> str:
    metadata = ((("authorization", f"Bearer {key}"),) if key else ()) + extra
    with grpc.insecure_channel(mesh.envoy) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        return stub.Generate(ask("red green", 2, model=model), timeout=30, metadata=metadata).text


def code_of(mesh: LocalMesh, model: str, key: str = "", extra: tuple = ()) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call(mesh, model, key, extra)
    return err.value.code()


def post(mesh: LocalMesh, path: str, body: dict, key: str = "") -> tuple[int, dict]:
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(f"http://{mesh.envoy}{path}", data=json.dumps(body).encode(),
                                 headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


CHAT = {"model": "echo", "messages": [{"role": "user", "content": "hi there"}], "max_tokens": 2}


def test_requests_without_a_good_key_are_unauthenticated(mesh: LocalMesh, keys: dict[str, str]) -> None:
    assert code_of(mesh, "echo") == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(mesh, "echo", "not-a-key") == grpc.StatusCode.UNAUTHENTICATED
    forged = keys["alpha"][:-4] + ("AAAA" if not keys["alpha"].endswith("AAAA") else "BBBB")
    assert code_of(mesh, "echo", forged) == grpc.StatusCode.UNAUTHENTICATED
    status, body = post(mesh, "/v1/generate", {"model": "echo", "prompt": "a b"})
    assert status == 401 and body["error"]["status"] == "UNAUTHENTICATED"
    status, body = post(mesh, "/v1/chat/completions", CHAT)
    assert status == 401 and "API key" in body["error"]["message"]


def test_a_key_admits_its_tenant_to_its_models_only(mesh: LocalMesh, keys: dict[str, str]) -> None:
    assert call(mesh, "echo", keys["alpha"]) == sim_text("red green", 2)
    assert code_of(mesh, "other", keys["alpha"]) == grpc.StatusCode.PERMISSION_DENIED
    assert call(mesh, "other", keys["wide"]) == sim_text("red green", 2)
    status, _ = post(mesh, "/v1/generate", {"model": "echo", "prompt": "a b"}, keys["alpha"])
    assert status == 200
    status, body = post(mesh, "/v1/chat/completions", CHAT, keys["alpha"])
    assert status == 200, body
    status, body = post(mesh, "/v1/chat/completions", {**CHAT, "model": "other"}, keys["alpha"])
    assert status == 403, body


def test_a_client_sent_tenant_header_counts_for_nothing(mesh: LocalMesh, keys: dict[str, str]) -> None:
    claim = (("x-meshserve-tenant", "wide"),)
    assert code_of(mesh, "other", extra=claim) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(mesh, "other", keys["alpha"], claim) == grpc.StatusCode.PERMISSION_DENIED


def test_keys_are_stored_hashed_and_revocation_takes_effect(mesh: LocalMesh, keys: dict[str, str]) -> None:
    made = operator(mesh, "keys", "create", "alpha")
    key = made.stdout.strip()
    key_id, secret = key.split("_")[1], key.split("_", 2)[2]

    async def stored() -> bytes:
        client = EtcdClient(mesh.etcd_endpoints, tls=mesh.client_tls)
        try:
            value = await client.get(keyspace.api_key_key(key_id))
        finally:
            await client.close()
        assert value is not None
        return value

    assert secret.encode() not in asyncio.run(stored())
    wait_for(lambda: call(mesh, "echo", key), timeout=10, what="the new key to work")
    assert operator(mesh, "keys", "revoke", key_id).returncode == 0
    wait_for(lambda: code_of(mesh, "echo", key) == grpc.StatusCode.UNAUTHENTICATED, timeout=10,
             what="the revoked key to be refused")
    assert call(mesh, "echo", keys["alpha"])  # the tenant's other key still works


def test_only_operators_change_the_mesh_and_every_change_is_audited(mesh: LocalMesh,
                                                                    keys: dict[str, str]) -> None:
    refused = operator(mesh, "model", "deploy", "sneaky", "--backend", "sim", cert="supervisor")
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr, refused.stderr
    assert "operator identity" in refused.stderr
    assert operator(mesh, "tenants", "create", "mallory", cert="supervisor").returncode == 1
    assert operator(mesh, "servers", cert="supervisor").returncode == 0  # reads are open
    audit = operator(mesh, "-o", "json", "audit", "--limit", "100")
    assert audit.returncode == 0, audit.stderr
    events = json.loads(audit.stdout)["events"]
    seen = {(e["action"].rpartition("/")[2], e["who"].rpartition("/")[2], e["outcome"]) for e in events}
    assert ("DeployModel", "supervisor", "PERMISSION_DENIED") in seen
    assert ("CreateTenant", "operator", "OK") in seen
    assert ("RevokeApiKey", "operator", "OK") in seen
    assert all("msk_" not in e.get("detail", "") for e in events)


def test_a_signed_token_names_the_tenant_like_a_key(mesh: LocalMesh, keys: dict[str, str],
                                                     tmp_path: Path) -> None:
    token = jwt_local.token(mesh.certs_dir, "alpha")
    assert call(mesh, "echo", token) == sim_text("red green", 2)
    assert code_of(mesh, "other", token) == grpc.StatusCode.PERMISSION_DENIED
    expired = jwt_local.token(mesh.certs_dir, "wide", ttl_s=60, now=time.time() - 3600)
    assert code_of(mesh, "other", expired) == grpc.StatusCode.UNAUTHENTICATED
    (tmp_path / "other").mkdir()
    jwt_local.ensure_issuer(tmp_path / "other")
    foreign = jwt_local.token(tmp_path / "other", "wide")
    assert code_of(mesh, "other", foreign) == grpc.StatusCode.UNAUTHENTICATED
    claim = (("x-meshserve-jwt-tenant", "wide"),)
    assert code_of(mesh, "other", extra=claim) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(mesh, "other", token, claim) == grpc.StatusCode.PERMISSION_DENIED
    status, body = post(mesh, "/v1/chat/completions", CHAT, token)  # via the OpenAI gateway
    assert status == 200, body
    ghost = jwt_local.token(mesh.certs_dir, "no-such-tenant")
    assert code_of(mesh, "echo", ghost) == grpc.StatusCode.UNAUTHENTICATED
