"""Port probing and picking (services/common/ports.py) on real sockets."""

from __future__ import annotations

import socket

import pytest

from services.common import ports
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan


def _leave_time_wait(port: int) -> None:
    """A listener (SO_REUSEADDR, like gRPC) that closes an accepted connection first, so the
    port is left with a TIME_WAIT socket and no listener."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = listener.accept()
        accepted.close()  # the server side closes first: TIME_WAIT stays on `port`
        client.recv(1)  # sees EOF
        client.close()


def _plain_bind_works(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_port_left_in_time_wait_is_free_and_a_listener_is_not():
    port = ports.free_port()
    _leave_time_wait(port)
    assert not _plain_bind_works(port), "precondition: the old probe refuses this port"
    assert ports.port_free("127.0.0.1", port)
    ports.check_port_free("127.0.0.1", port)
    with socket.socket() as holder:  # a restarted server takes the port, as the probe promised
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert not ports.port_free("127.0.0.1", port)
        with pytest.raises(ports.PortInUseError, match=str(port)):
            ports.check_port_free("127.0.0.1", port)


def test_free_ports_lie_outside_the_ephemeral_range_and_can_be_bound():
    low, high = ports.ephemeral_range()
    picked = [ports.free_port() for _ in range(40)]
    assert len(set(picked)) == len(picked)
    for port in picked:
        assert not low <= port <= high, (port, (low, high))
        assert ports.PICK_RANGE[0] <= port <= ports.PICK_RANGE[1]
        assert ports.port_free("127.0.0.1", port)


def test_a_block_is_consecutive_free_ports():
    base = ports.free_port_block(81)
    assert all(ports.port_free("127.0.0.1", p) and not ports.in_ephemeral_range(p)
               for p in range(base, base + 81))


def test_without_ports_outside_the_range_the_os_picks(tmp_path, monkeypatch):
    everything = tmp_path / "range"
    everything.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", everything)
    assert ports.ephemeral_range() == (1024, 65535)
    assert ports.free_port() > 0
    with pytest.raises(ports.PortInUseError):
        ports.free_port_block(3)


def test_meshserve_up_default_ports_lie_outside_the_ephemeral_range(tmp_path):
    from services.cli.up import DEFAULT_BASE_PORT

    plan = MeshPlan(data_dir=tmp_path, base_port=DEFAULT_BASE_PORT,
                    servers=[ServerPlan("server-0"), ServerPlan("server-1")])
    mesh = LocalMesh(plan)
    assert mesh.ports.ephemeral() == []
    low, high = ports.DEFAULT_EPHEMERAL
    assert all(not low <= p <= high for p in mesh.ports.assigned.values())


def test_a_fixed_base_inside_the_ephemeral_range_is_reported(tmp_path):
    low, _high = ports.ephemeral_range()
    mesh = LocalMesh(MeshPlan(data_dir=tmp_path, base_port=low, servers=[ServerPlan("s")]))
    assert f"envoy ({low})" in mesh.ports.ephemeral()
