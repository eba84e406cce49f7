"""Restarts in seconds: a killed process, and a whole mesh right after a stop, come back on the
same ports although connections of the previous process still sit in TIME_WAIT there (the old
probe refused such a port for 40-75 s)."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.common.ports import free_port_block
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from services.localmesh.processes import StartError
from tests.conftest import running_mesh, wait_for

pytestmark = pytest.mark.e2e

LISTEN = "0A"  # socket state in /proc/net/tcp


def leftovers(port: int) -> list[str]:
    """States (hex, /proc/net/tcp) of sockets on a local port other than a listener: what a
    stopped or killed server leaves behind (TIME_WAIT = 06, FIN_WAIT2 = 05, ...)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] != LISTEN:
                found.append(fields[3])
    return found


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def ask(target: str) -> str:
    req = inference_pb2.GenerateRequest(model="echo", prompt="back again")
    req.sampling.max_tokens = 2
    with grpc.insecure_channel(target) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).Generate(req, timeout=10).text


def open_clients(address: str, count: int = 2) -> list[grpc.Channel]:
    """Client connections that stay open (one each) while the server goes away."""
    channels = [grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
                for _ in range(count)]
    for ch in channels:
        health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return channels


def scrape(address: str) -> None:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=10) as resp:
        resp.read()


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("restarts"), base_port=0, lease_ttl=3,
                    load_timeout_s=60, servers=[ServerPlan("server-0", ["echo=sim"])])
    with running_mesh(plan) as m:
        yield m


@pytest.mark.parametrize("name", ["server-0", "router0", "controlplane0"])
def test_a_killed_process_serves_again_on_its_port(mesh, name):
    address = {"server-0": mesh.servers["server-0"], "router0": mesh.routers[0],
               "controlplane0": mesh.controlplane}[name]
    assert ask(mesh.envoy) == "back again"  # Envoy -> router -> server connections are open
    clients = open_clients(address)
    scrape(mesh.metrics[name])
    try:
        mesh.sup.kill(mesh.children[name])
        wait_for(lambda: bool(leftovers(port_of(address))), 10,
                 f"connections of the killed {name} left on its port (the case under test)")
        # Restarted on the same ports at once; start_* fails fast if the process exits, as it
        # did with "port already in use" while those connections were in TIME_WAIT.
        if name == "server-0":
            mesh.start_server(mesh.plan.servers[0])
        elif name == "router0":
            mesh.start_router(0)
        else:
            mesh.start_controlplane(0)
        wait_for(lambda: ask(mesh.envoy) == "back again", 60,
                 f"requests through Envoy to succeed with {name} restarted")
    finally:
        for ch in clients:
            ch.close()


def test_the_mesh_starts_again_on_its_ports_right_after_a_stop(tmp_path):
    plan = MeshPlan(data_dir=tmp_path, base_port=free_port_block(81), lease_ttl=3,
                    servers=[ServerPlan("server-0", ["echo=sim"])])
    with running_mesh(plan) as first:
        assert ask(first.envoy) == "back again"
        # Connections held across the stop, so the servers close first and leave TIME_WAIT.
        clients = [*open_clients(first.envoy, 1), *open_clients(first.controlplane, 1),
                   *open_clients(first.routers[0], 1)]
        for address in first.metrics.values():
            scrape(address)
        ports = dict(first.ports.assigned)
    try:
        assert any(leftovers(p) for p in ports.values()), "precondition: no TIME_WAIT left"
        with running_mesh(plan) as second:
            assert second.ports.assigned == ports
            assert ask(second.envoy) == "back again"
    finally:
        for ch in clients:
            ch.close()
    # The first run's logs were moved aside, not mixed with the second run's.
    for log in ("router0.log", "server-0.log", "envoy-server.log", "etcd0.log"):
        assert (tmp_path / "logs.previous" / log).exists(), log
    router_log = (tmp_path / "logs" / "router0.log").read_text()
    assert router_log.count("starting router0") == 1
    assert (tmp_path / "logs.previous" / "router0.log").read_text().count("starting router0") == 1


def test_a_second_mesh_on_ports_in_use_is_refused(tmp_path):
    plan = MeshPlan(data_dir=tmp_path / "a", base_port=free_port_block(81), lease_ttl=3,
                    servers=[ServerPlan("server-0", ["echo=sim"])])
    with running_mesh(plan):
        clash = LocalMesh(MeshPlan(data_dir=tmp_path / "b", base_port=plan.base_port,
                                   servers=[ServerPlan("server-0", ["echo=sim"])]))
        with pytest.raises(StartError, match="already in use"):
            clash.start()
        assert not clash.children  # nothing was started
