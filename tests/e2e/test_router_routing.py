"""Routing on real processes: session affinity across router replicas, affinity yielding to a
saturated server, locality and spill-over between two regions, shedding by priority.

One mesh: two routers (region eu) and three sim servers, two in eu (zones a, b) and one in us,
each running at most 2 sequences so that a test can saturate a server with two long streams.
A test that saturates servers releases them and waits until they report themselves idle, so each
test passes alone and in any order.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import grpc
import pytest
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, modelserver_pb2, modelserver_pb2_grpc

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, metrics_text, running_mesh, wait_for

pytestmark = pytest.mark.e2e

MODEL = "echo"
SIM = ["tokens_per_second=40", "max_running=2"]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    plan = MeshPlan(
        data_dir=tmp_path_factory.mktemp("routing"), base_port=0, lease_ttl=3, routers=2,
        router_args=["--region", "eu"],
        servers=[ServerPlan("eu-1", [f"{MODEL}=sim"], region="eu", zone="eu-a", engine_options=SIM),
                 ServerPlan("eu-2", [f"{MODEL}=sim"], region="eu", zone="eu-b", engine_options=SIM),
                 ServerPlan("us-1", [f"{MODEL}=sim"], region="us", zone="us-a", engine_options=SIM)])
    with running_mesh(plan) as m:
        yield m


@pytest.fixture(scope="module")
def stubs(mesh):
    channels = [grpc.insecure_channel(a) for a in mesh.routers]
    wait_for(lambda: all(_ready_everywhere(inference_pb2_grpc.InferenceServiceStub(c))
                         for c in channels), 30, "both routers to see all three servers")
    yield [inference_pb2_grpc.InferenceServiceStub(c) for c in channels]
    for c in channels:
        c.close()


def _ready_everywhere(stub) -> bool:
    models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
    return [(m.name, m.ready_replicas) for m in models] == [(MODEL, 3)]


def _idle(stub: modelserver_pb2_grpc.ModelServerServiceStub) -> bool:
    """Whether the server's own load report shows nothing running or queued."""
    call = stub.StreamLoad(modelserver_pb2.StreamLoadRequest(), timeout=5)
    try:
        report = next(call).report
        return report.running == 0 and report.queue_depth == 0
    finally:
        call.cancel()


@contextmanager
def hold(mesh: LocalMesh, server_id: str, n: int = 2) -> Iterator[None]:
    """n long streams straight on one model server: its load reports show it saturated. On the way
    out they are cancelled and the server is idle again before the next test."""
    channel = grpc.insecure_channel(mesh.servers[server_id])
    stub = modelserver_pb2_grpc.ModelServerServiceStub(channel)
    req = modelserver_pb2.ModelServerServiceGenerateRequest(
        model=MODEL, prompt="hold the slot", priority=common_pb2.PRIORITY_CRITICAL)
    req.sampling.max_tokens = 1200  # 30 s at 40 tokens/s: until cancelled
    calls = [stub.Generate(req, timeout=60) for _ in range(n)]
    try:
        for c in calls:
            next(c)  # running
        yield
    finally:
        for c in calls:
            c.cancel()
        wait_for(lambda: _idle(stub), 10, f"{server_id} to report itself idle")
        channel.close()


def _served(stub, n=1, timeout=30.0, **kw) -> Counter[str]:
    """Where n requests went. Right after a server saturates, a short timeout keeps a request
    that went there before its load report arrived from blocking a wait_for."""
    return Counter(stub.Generate(ask(**kw), timeout=timeout).served_by.server_id
                   for _ in range(n))


def _homes(stubs, session: str) -> list[str]:
    """Where each router sends the session, twice each."""
    return [s.Generate(ask(session_id=session), timeout=30).served_by.server_id
            for s in stubs for _ in range(2)]


def test_router_replicas_pick_the_same_server_for_a_session(mesh, stubs):
    # Load reports reach each router on its own stream: right after another test's load ends they
    # may briefly differ; wait until the replicas agree on a few probe sessions.
    wait_for(lambda: all(len(set(_homes(stubs, f"probe-{j}"))) == 1 for j in range(4)), 10,
             "the routers to agree")
    # Affinity has a load bound: a request may leave its home when a load report that has not yet
    # caught up shows the home busier (seen on a loaded CI machine). So a few moves are allowed;
    # without affinity the two eu servers would each get about half of every session's requests.
    homes, moved = {}, 0
    for i in range(12):
        picks = Counter(_homes(stubs, f"user-{i}"))
        homes[i], n = picks.most_common(1)[0]
        moved += 4 - n
    assert moved <= 4, (moved, homes)
    # Sessions spread over the local region only (the routers are in eu).
    assert set(homes.values()) == {"eu-1", "eu-2"}
    # The session header works as well as the field, through either router.
    elsewhere = [(i, resp.served_by.server_id) for i, home in homes.items() for s in stubs
                 if (resp := s.Generate(ask(), timeout=30, metadata=(("x-session-id", f"user-{i}"),))
                     ).served_by.server_id != home]
    assert len(elsewhere) <= 2, elsewhere
    assert 'reason="affinity"' in metrics_text(mesh.metrics["router0"])


def test_affinity_yields_to_a_saturated_server_and_returns(mesh, stubs):
    router = stubs[0]
    home = router.Generate(ask(session_id="sticky"), timeout=30).served_by.server_id
    other = ({"eu-1", "eu-2"} - {home}).pop()
    with hold(mesh, home):
        wait_for(lambda: _served(router, timeout=1, session_id="sticky") == Counter({other: 1}), 10,
                 "the session to leave its saturated server")
        assert _served(router, 3, session_id="sticky") == Counter({other: 3})
    wait_for(lambda: _served(router, session_id="sticky") == Counter({home: 1}), 30,
             "the session to return home")


def test_locality_prefers_the_requests_region_and_spills_when_it_is_saturated(mesh, stubs):
    router = stubs[0]
    wait_for(lambda: _served(router, 6, region="us") == Counter({"us-1": 6}), 30,
             "us requests to stay in us")
    local = _served(router, 10)  # no region: the router's own (eu)
    assert set(local) <= {"eu-1", "eu-2"}
    with hold(mesh, "us-1"):
        wait_for(lambda: set(_served(router, timeout=1, region="us")) <= {"eu-1", "eu-2"}, 10,
                 "us requests to spill to eu")
        resp = router.Generate(ask(region="us"), timeout=30)
        assert resp.served_by.region == "eu"
    assert 'reason="spill"' in metrics_text(mesh.metrics["router0"])


def _shed(router) -> bool:
    try:
        router.Generate(ask(priority=common_pb2.PRIORITY_SHEDDABLE), timeout=1)
        return False
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return False  # sent before the saturation was reported: it waits at the server
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "retry after" in exc.details()
        assert int(dict(exc.trailing_metadata())["retry-after-ms"]) > 0
        return True


def test_shedding_by_priority_when_everything_is_saturated(mesh, stubs):
    router = stubs[0]
    with hold(mesh, "eu-1"), hold(mesh, "eu-2"), hold(mesh, "us-1"):
        wait_for(lambda: _shed(router), 10, "SHEDDABLE requests to be shed")
        with pytest.raises(grpc.RpcError) as info:
            router.Generate(ask(priority=common_pb2.PRIORITY_STANDARD), timeout=1.0)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # STANDARD with room in its deadline waits in the router's queue and is served once a
        # server has room; CRITICAL goes ahead to a server (which queues it by priority).
        result: dict = {}
        threads = [threading.Thread(target=lambda p=p: result.update(
            {p: router.Generate(ask(priority=p), timeout=60)}))
            for p in (common_pb2.PRIORITY_STANDARD, common_pb2.PRIORITY_CRITICAL)]
        for t in threads:
            t.start()
        wait_for(lambda: _queued(mesh) == 1.0, 10, "the STANDARD request to queue in the router")
    for t in threads:
        t.join(60)
    assert {p: r.usage.completion_tokens for p, r in result.items()} == {
        common_pb2.PRIORITY_STANDARD: 2, common_pb2.PRIORITY_CRITICAL: 2}


def _queued(mesh) -> float:
    """Requests waiting in router0's queues (the gauge is per model)."""
    return sum(float(line.split()[-1]) for line in metrics_text(mesh.metrics["router0"]).splitlines()
               if line.startswith("meshserve_router_queue_depth{"))
