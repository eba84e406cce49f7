"""API keys, tenants and the router's access rules as plain values (no gRPC, no etcd)."""

from __future__ import annotations

import pytest
from meshserve.v1 import auth_pb2

from services.common import auth_records, keyspace
from services.common.errors import InvalidArgument, PermissionDenied, Unauthenticated
from services.controlplane.operator_gate import needs_operator
from services.router.access import TENANT_HEADER, Access


def keyset_with(tenant: str, models: list[str]) -> tuple[auth_records.KeySet, str, str]:
    keys = auth_records.KeySet()
    keys.apply(keyspace.tenant_key(tenant), keyspace.encode(auth_pb2.Tenant(name=tenant, models=models)))
    record, whole = auth_records.new_key(tenant, "test", 1)
    keys.apply(keyspace.api_key_key(record.key_id), keyspace.encode(record))
    return keys, record.key_id, whole


def test_a_key_authenticates_until_revoked_or_its_tenant_goes() -> None:
    keys, key_id, whole = keyset_with("alpha", ["echo"])
    assert keys.authenticate(whole) == "alpha"
    assert whole.split("_", 2)[2] not in str(keys.keys[key_id])  # only the hash is kept
    assert keys.authenticate(whole[:-1] + ("A" if whole[-1] != "A" else "B")) is None
    assert keys.authenticate("msk_" + key_id) is None and keys.authenticate("") is None
    keys.apply(keyspace.tenant_key("alpha"), None)
    assert keys.authenticate(whole) is None
    keys, key_id, whole = keyset_with("alpha", ["echo"])
    revoked = keys.keys[key_id]
    revoked.revoked = True
    keys.apply(keyspace.api_key_key(key_id), keyspace.encode(revoked))
    assert keys.authenticate(whole) is None


def test_corrupt_or_mismatched_records_authenticate_nobody() -> None:
    keys, key_id, whole = keyset_with("alpha", ["*"])
    keys.apply(keyspace.api_key_key(key_id), b"\xff\xff not protobuf")
    assert keys.authenticate(whole) is None
    keys.apply(keyspace.tenant_key("beta"), keyspace.encode(auth_pb2.Tenant(name="gamma", models=["*"])))
    assert "beta" not in keys.tenants


def test_models_per_tenant() -> None:
    keys, _, _ = keyset_with("alpha", ["echo", "chat"])
    assert keys.may_call("alpha", "echo") and keys.may_call("alpha", "chat@v2")
    assert not keys.may_call("alpha", "other") and not keys.may_call("nobody", "echo")


@pytest.mark.parametrize("models", [[], ["bad name"], ["a/b"]])
def test_tenant_records_are_checked(models: list[str]) -> None:
    with pytest.raises(InvalidArgument):
        auth_records.check_tenant(auth_pb2.Tenant(name="t", models=models))


def test_keys_come_from_bearer_or_x_api_key() -> None:
    assert auth_records.key_from_headers({"authorization": "Bearer k1"}) == "k1"
    assert auth_records.key_from_headers({"x-api-key": "k2"}) == "k2"
    assert auth_records.key_from_headers({"authorization": "Basic xyz"}) == ""


class FakeContext:
    def __init__(self, san: str | None, metadata: tuple = ()) -> None:
        self._ctx = {"x509_subject_alternative_name": [san.encode()]} if san else {}
        self._metadata = metadata

    def auth_context(self) -> dict:
        return self._ctx

    def invocation_metadata(self) -> tuple:
        return self._metadata


ENVOY = "spiffe://meshserve.local/envoy/envoy"


def test_routers_believe_the_tenant_header_only_from_envoy() -> None:
    keys, _, _ = keyset_with("alpha", ["echo"])
    access = Access(keys, enforce=True)
    assert access.admit(FakeContext(ENVOY, ((TENANT_HEADER, "alpha"),)), "echo").tenant == "alpha"
    with pytest.raises(PermissionDenied):
        access.admit(FakeContext(ENVOY, ((TENANT_HEADER, "alpha"),)), "other")
    with pytest.raises(Unauthenticated):
        access.admit(FakeContext(ENVOY), "echo")
    with pytest.raises(Unauthenticated):
        access.admit(FakeContext(ENVOY, ((TENANT_HEADER, "ghost"),)), "echo")
    inside = access.admit(FakeContext("spiffe://meshserve.local/operator/op", ((TENANT_HEADER, "alpha"),)),
                          "other")
    assert inside.tenant is None  # a mesh identity; its tenant header is ignored
    with pytest.raises(Unauthenticated):
        access.admit(FakeContext(None), "echo")


def test_operator_methods() -> None:
    assert needs_operator("/meshserve.v1.ControlPlaneService/DeployModel")
    assert needs_operator("/meshserve.v1.AuthService/ListApiKeys")
    assert not needs_operator("/meshserve.v1.ControlPlaneService/ListServers")
    assert not needs_operator("/meshserve.v1.InferenceService/Generate")


def test_the_edge_tenant_replaces_a_client_written_one() -> None:
    from meshserve.v1 import inference_pb2

    from services.common.validation import validate_request

    keys, _, _ = keyset_with("alpha", ["*"])
    access = Access(keys, enforce=True)
    req = validate_request(inference_pb2.GenerateRequest(model="echo", prompt="x", tenant="victim"))
    edge = access.admit(FakeContext(ENVOY, ((TENANT_HEADER, "alpha"),)), "echo")
    assert access.bind_tenant(edge, req).tenant == "alpha"
    inside = access.admit(FakeContext("spiffe://meshserve.local/client/tool"), "echo")
    assert access.bind_tenant(inside, req).tenant == "victim"
