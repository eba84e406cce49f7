"""Backpressure through the real edge: clients that stop reading make Envoy and the router stop
pulling, instead of buffering the whole answer (Envoy's default 256 MiB stream window buffered
+245 MB in 20 s for one unread stream)."""

from __future__ import annotations

import urllib.request

import grpc
import pytest
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import MeshPlan, ServerPlan
from services.localmesh.processes import rss_bytes
from tests.conftest import running_mesh, wait_for

pytestmark = pytest.mark.e2e

UNREAD = 20
MIB = 1024 * 1024
#: One word of 4000 characters: the sim engine repeats prompt words, so every token chunk carries
#: ~4 KB and each stream is ~8 MB in all (2000 tokens), 160 MB for the 20 streams.
PROMPT = "w" * 4000
#: Per unread stream Envoy may hold its downstream stream buffer (256 KiB, the HTTP/2 stream
#: window) + the upstream window (64 KiB) + two 64 KiB connection buffers, ~0.45 MiB; the router
#: its 64 KiB receive window + a chunk or two. 20 streams: ~9 MiB at Envoy, ~2 MiB at the router.
#: The bound leaves room for allocator slack and per-connection costs; without the limits Envoy
#: grew by over 70 MB within 10 s in this test.
RSS_GROWTH_BOUND = 32 * MIB
#: What Envoy may take in from the routers for these streams: windows and buffers above plus the
#: clients' own 64 KiB windows, ~0.5 MiB a stream; 1 MiB each is generous and 8x below the answer.
RX_BOUND = UNREAD * MIB


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("flow"), base_port=0, lease_ttl=3,
                    # The stall watchdog would treat a blocked relay as a silent server.
                    router_args=["--stall-timeout", "600"],
                    servers=[ServerPlan("server-0", ["echo=sim"],
                                        engine_options=["tokens_per_second=2000"])])
    with running_mesh(plan) as m:
        yield m


def envoy_stat(mesh, name: str) -> int:
    url = f"http://{mesh.envoy_admin}/stats?filter=^{name}$"
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
    raise KeyError(name)


def _settled(read, what: str, timeout: float = 60.0) -> int:
    """Wait until a byte counter stops moving for a second: the senders are blocked."""
    samples: list[int] = []

    def still() -> bool:
        samples.append(read())
        return len(samples) >= 3 and samples[-1] == samples[-3]

    wait_for(still, timeout, what, interval=0.5)
    return samples[-1]


def test_unread_streams_stay_bounded_and_others_are_served(mesh):
    pids = {"envoy": mesh.children["envoy"].pid, "router": mesh.children["router0"].pid}
    rss_before = {name: rss_bytes(pid) for name, pid in pids.items()}
    rx = "cluster.routers.upstream_cx_rx_bytes_total"
    rx_before = envoy_stat(mesh, rx)
    request = inference_pb2.GenerateRequest(model="echo", prompt=PROMPT)
    request.sampling.max_tokens = 2000
    # Separate connections, each with a fixed 64 KiB window (no BDP growth) like a small client.
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.http2.bdp_probe", 0)]
    channels = [grpc.insecure_channel(mesh.envoy, options=options) for _ in range(UNREAD)]
    calls = [inference_pb2_grpc.InferenceServiceStub(ch).GenerateStream(request, timeout=300)
             for ch in channels]
    try:
        wait_for(lambda: envoy_stat(mesh, "cluster.routers.upstream_rq_active") >= UNREAD, 30,
                 "the unread streams to reach the router")
        received = _settled(lambda: envoy_stat(mesh, rx), "Envoy to stop pulling from the router")
        growth = {name: rss_bytes(pid) - rss_before[name] for name, pid in pids.items()}
        assert received - rx_before < RX_BOUND, (received - rx_before, growth)
        assert growth["envoy"] < RSS_GROWTH_BOUND, growth
        assert growth["router"] < RSS_GROWTH_BOUND, growth
        assert not any(call.done() for call in calls)  # blocked, not finished or failed
        other = inference_pb2.GenerateRequest(model="echo", prompt="meanwhile")
        other.sampling.max_tokens = 3
        with grpc.insecure_channel(mesh.envoy) as channel:
            answer = inference_pb2_grpc.InferenceServiceStub(channel).Generate(other, timeout=30)
        assert answer.text == "meanwhile meanwhile meanwhile"
    finally:
        for call in calls:
            call.cancel()
        for ch in channels:
            ch.close()
    wait_for(lambda: envoy_stat(mesh, "cluster.routers.upstream_rq_active") == 0, 30,
             "the cancelled streams to end at the router")


def test_a_reading_client_gets_the_whole_long_answer(mesh):
    """The bounds throttle nothing for a client that reads: the same 8 MB answer arrives."""
    request = inference_pb2.GenerateRequest(model="echo", prompt=PROMPT)
    request.sampling.max_tokens = 2000
    with grpc.insecure_channel(mesh.envoy) as channel:
        chunks = list(inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream(
            request, timeout=300))
    assert sum(len(c.token_ids) for c in chunks) == 2000
    assert chunks[-1].usage.completion_tokens == 2000
