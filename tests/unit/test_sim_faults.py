"""The sim engine's fault injection for traffic tests: errors from a given time, slow loads."""

import pytest

from services.common.errors import InvalidArgument
from services.modelserver.engine.base import EngineUnavailableError
from services.modelserver.engine.options import validate_options
from services.modelserver.engine.sim import SimConfig, SimEngine
from tests.unit.test_sim_engine import R, collect, started


async def test_error_rate_fails_requests_before_the_first_token():
    engine = await started(SimConfig(tokens_per_second=10_000, error_rate=1.0))
    with pytest.raises(EngineUnavailableError, match="injected fault"):
        await collect(engine, R())
    later = await started(SimConfig(tokens_per_second=10_000, error_rate=1.0, error_after_s=3600))
    assert len(await collect(later, R())) == 4  # the fault starts in an hour


async def test_load_s_keeps_the_engine_unready_while_it_loads():
    engine = SimEngine("echo", SimConfig(load_s=0.05))
    assert not engine.ready
    await engine.start()
    assert engine.ready


def test_fault_options_are_deployable_and_checked():
    assert validate_options("sim", {"error_rate": "0.5", "error_after_s": "10", "load_s": "2"}) == {
        "error_rate": 0.5, "error_after_s": 10.0, "load_s": 2.0}
    with pytest.raises(InvalidArgument, match="error_rate"):
        validate_options("sim", {"error_rate": "1.5"})
