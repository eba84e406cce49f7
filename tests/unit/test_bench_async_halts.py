"""bench-async stops a part on a model the control plane halted, instead of waiting it out, and
does not mistake the control plane's view catching up after a retry for a new halt."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from meshserve.v1 import controlplane_pb2 as cp

from bench.asyncjobs import common


class FakeControlPlane:
    """Deployments as a lagging view shows them: `views` one per poll; RetryModel bumps the generation."""

    def __init__(self, views: list[cp.Deployment]) -> None:
        self.views = views
        self.generation = 1
        self.retries = 0

    def RetryModel(self, request: cp.RetryModelRequest, timeout: float) -> cp.RetryModelResponse:
        self.retries += 1
        self.generation += 1
        return cp.RetryModelResponse(deployment=cp.Deployment(spec=cp.ModelSpec(name=request.name,
                                                                                generation=self.generation)))

    def deployment(self, mesh: object, name: str) -> cp.Deployment:
        return self.views.pop(0) if len(self.views) > 1 else self.views[0]


def halted(generation: int) -> cp.Deployment:
    return cp.Deployment(spec=cp.ModelSpec(name="m", generation=generation), halted=True,
                         unsatisfied_reason=f"HALTED: failed to load (generation {generation})")


def ready() -> cp.Deployment:
    return cp.Deployment(spec=cp.ModelSpec(name="m", generation=2), ready_replicas=2)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    def install(views: list[cp.Deployment]) -> FakeControlPlane:
        plane = FakeControlPlane(views)
        monkeypatch.setattr(common.controlplane_pb2_grpc, "ControlPlaneServiceStub", lambda channel: plane)
        monkeypatch.setattr(common, "_deployment", plane.deployment)
        monkeypatch.setattr(common.time, "sleep", lambda s: None)
        return plane
    return install


MESH = SimpleNamespace(controlplane="127.0.0.1:1")


def test_a_model_that_halts_after_every_retry_stops_the_part(fake):
    plane = fake([halted(1), halted(2), halted(3)])
    with pytest.raises(common.ModelHalted, match="halted again after 2 retries"):
        common.wait_ready(MESH, "m", 2, timeout=60)  # type: ignore[arg-type]
    assert plane.retries == 2


def test_a_stale_halt_after_a_retry_is_not_counted_again(fake):
    plane = fake([halted(1), halted(1), halted(1), halted(1), ready()])
    assert len(common.wait_ready(MESH, "m", 2, timeout=60)) == 1  # type: ignore[arg-type]
    assert plane.retries == 1


def test_a_halt_in_the_middle_of_a_part_is_reported(fake):
    fake([halted(4)])
    with pytest.raises(common.ModelHalted, match="halted while the bench ran"):
        common.check_not_halted(MESH, "m")  # type: ignore[arg-type]
