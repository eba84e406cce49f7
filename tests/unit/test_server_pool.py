"""The local server pool's choices (serverpool.py) against a fake mesh and a scripted control
plane: one server started at a time and only when placement is short, idle ones stopped after
the idle period, never below MIN; and the `--server-pool` range parsing."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
from meshserve.v1 import autoscale_pb2 as asp

from services.localmesh.mesh import MeshPlan, ServerPlan
from services.localmesh.serverpool import PoolSettings, ServerPool, parse_range


@dataclass
class FakeChild:
    running: bool = True
    log_path: str = ""

    def alive(self) -> bool:
        return self.running


@dataclass
class FakeMesh:
    plan: MeshPlan
    children: dict[str, FakeChild] = field(default_factory=dict)
    servers: dict[str, str] = field(default_factory=dict)

    def start_server(self, server: ServerPlan, wait: bool = True) -> None:
        self.children[server.server_id] = FakeChild()

    def stop_server(self, server_id: str) -> None:
        self.children.pop(server_id, None)


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def pool(answers: list[asp.GetCapacityResponse], idle_s: float = 10.0):
    """A pool of s0 (running) .. s3, MIN 1, MAX 3; `serving[0]` says whether a started server
    already serves."""
    plans = [ServerPlan(f"s{i}") for i in range(4)]
    mesh = FakeMesh(MeshPlan(data_dir=Path("."), servers=plans[:1], standby_servers=plans[1:]),
                    children={"s0": FakeChild()})
    clock, serving = Clock(), [False]
    p = ServerPool(mesh, PoolSettings(1, 3, idle_s=idle_s), lambda: answers[0],  # type: ignore[arg-type]
                   clock=clock, serving=lambda sid: serving[0])
    return p, mesh, clock, serving


def test_starts_one_server_at_a_time_while_placement_is_short_and_never_above_max():
    answers = [asp.GetCapacityResponse(servers_short=3, reason="echo: 3 replica(s) without a server")]
    p, mesh, clock, serving = pool(answers)
    p.step()
    p.step()
    assert p.running() == ["s0", "s1"] and p.started == 1  # waits for s1 to serve
    serving[0] = True
    for _ in range(5):
        p.step()
    assert p.running() == ["s0", "s1", "s2"]  # MAX 3, though still short


def test_idle_servers_stop_after_the_idle_period_down_to_min():
    answers = [asp.GetCapacityResponse(servers_short=1)]
    p, mesh, clock, serving = pool(answers)
    serving[0] = True
    p.step()
    answers[0] = asp.GetCapacityResponse(idle_servers=["s0", "s1"])  # load went away
    p.step()
    clock.t = 5
    p.step()
    assert p.running() == ["s0", "s1"]  # not idle long enough yet
    clock.t = 11
    p.step()
    assert p.running() == ["s0"] and p.stopped == 1  # the last planned goes; MIN 1 stays


def test_a_server_that_dies_while_starting_is_started_again():
    answers = [asp.GetCapacityResponse(servers_short=1)]
    p, mesh, _, _ = pool(answers)
    p.step()
    first = mesh.children["s1"]
    first.running = False
    p.step()
    assert p.started == 2 and mesh.children["s1"] is not first and mesh.children["s1"].alive()


@pytest.mark.parametrize("text, expected", [("1:4", (1, 4)), ("2", (2, 2))])
def test_range_parsing(text, expected):
    assert parse_range(text) == expected


@pytest.mark.parametrize("low, high", [(3, 2), (0, 0), (-1, 2)])
def test_bad_ranges_are_refused(low, high):
    with pytest.raises(ValueError):
        PoolSettings(low, high)
    with pytest.raises(ValueError, match="MIN:MAX"):
        parse_range("a:b")
