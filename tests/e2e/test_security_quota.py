"""Per-tenant quotas on a real secure mesh with two routers: a burst spread over both replicas is
held to the tenant's requests/s (each router enforces its share), tokens/minute is charged from
the answers' real usage, refusals carry retry-after, and usage is in each router's metrics."""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
from meshserve.v1 import inference_pb2_grpc
from meshserve.v1.inference_pb2 import ListModelsRequest

from services.common import grpc_util
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, metrics_text, running_mesh, wait_for

BURST_RPS = 4
TOKENS_PER_MINUTE = 24  # 12 per router: one answer of 4 prompt + 8 completion tokens


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("quota-mesh"), base_port=0, secure=True,
                    lease_ttl=3, routers=2, servers=[ServerPlan("server-0", ["echo=sim"])])
    with running_mesh(plan) as m:
        for tenant, quota in [("bursty", ["--rps", str(BURST_RPS)]),
                              ("wordy", ["--tpm", str(TOKENS_PER_MINUTE)])]:
            done = meshctl("--controlplane", m.controlplane, "tenants", "create", tenant, *quota,
                           certs=m.certs_dir)
            assert done.returncode == 0, done.stderr
        yield m


def as_envoy(mesh: LocalMesh, router: str, tenant: str) -> tuple[grpc.Channel, tuple]:
    """What Envoy sends after ext_authz: its certificate and the tenant header."""
    return grpc_util.channel(router, options=[], tls=mesh.tls("envoy")), (("x-meshserve-tenant", tenant),)


def retry_after_ms(err: grpc.RpcError) -> int:
    trailers = dict(err.trailing_metadata() or ())
    return int(trailers.get("retry-after-ms", 0))


def test_a_burst_over_two_routers_is_held_to_the_tenant_quota(mesh: LocalMesh) -> None:
    channels = [as_envoy(mesh, r, "bursty") for r in mesh.routers]
    stubs = [(inference_pb2_grpc.InferenceServiceStub(ch), md) for ch, md in channels]
    for stub, md in stubs:  # both routers know the tenant before the burst (ListModels is free)
        def known(s: inference_pb2_grpc.InferenceServiceStub = stub, m: tuple = md) -> object:
            return s.ListModels(ListModelsRequest(), timeout=10, metadata=m)

        wait_for(known, timeout=15, what="the tenant to reach the router")
    started = time.monotonic()
    futures = [stub.Generate.future(ask("x y", 1), timeout=30, metadata=md)
               for _ in range(10) for stub, md in stubs]
    admitted, refused = 0, []
    for f in futures:
        try:
            f.result()
            admitted += 1
        except grpc.RpcError as err:
            refused.append(err)
    elapsed = time.monotonic() - started
    for ch, _ in channels:
        ch.close()
    assert admitted >= 2, "each router admits its share"
    assert admitted <= BURST_RPS * (1 + elapsed) + 1, (admitted, elapsed)
    assert refused and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in refused)
    assert all(retry_after_ms(e) > 0 and "quota" in e.details() for e in refused)


def test_tokens_per_minute_are_charged_from_real_usage(mesh: LocalMesh) -> None:
    channel, md = as_envoy(mesh, mesh.routers[0], "wordy")
    with channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        first = wait_for(lambda: stub.Generate(ask("a b c d", 8), timeout=10, metadata=md),
                         timeout=15, what="the tenant to reach the router")
        assert first.usage.prompt_tokens + first.usage.completion_tokens == 12
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(ask("a b c d", 8), timeout=10, metadata=md)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tokens/min" in err.value.details() and retry_after_ms(err.value) > 1000
    text = metrics_text(mesh.metrics["router0"])
    assert 'meshserve_router_tenant_tokens_total{kind="prompt",tenant="wordy"} 4.0' in text
    assert 'meshserve_router_tenant_tokens_total{kind="completion",tenant="wordy"} 8.0' in text
    assert 'meshserve_router_tenant_requests_total{outcome="quota_tokens",tenant="wordy"} 1.0' in text
