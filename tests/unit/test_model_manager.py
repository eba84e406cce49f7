"""ModelManager: loads placed models while serving, releases, evicts, reports failures."""

import asyncio

from meshserve.v1 import controlplane_pb2 as cp

from services.modelserver.engine import ModelSpec
from services.modelserver.manager import ModelManager

MB = 2**20


def spec(name, memory=0, **options):
    s = cp.ModelSpec(name=name, backend="sim", memory_bytes=memory)
    for k, v in options.items():
        s.options[k] = str(v)
    return s


async def settle(manager, condition, rounds=200):
    for _ in range(rounds):
        await manager.reconcile()
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("manager did not settle")


def test_pinned_and_placed_models_with_status_reports():
    async def go():
        reports = []
        m = ModelManager("s", [ModelSpec("pinned", "sim")],
                         on_status=lambda name, st: reports.append((name, st and st.state)))
        await m.start_pinned()
        assert m.ready_models() == ["pinned"] and m.get("pinned") is not None
        m.set_placements({"a": spec("a")})
        await settle(m, lambda: m.get("a") is not None)
        assert ("a", cp.MODEL_STATE_LOADING) in reports and ("a", cp.MODEL_STATE_READY) in reports
        assert m.ready_models() == ["a", "pinned"]
        await m.stop()
    asyncio.run(go())


def test_released_model_stays_loaded_and_comes_back_instantly():
    async def go():
        reports = []
        m = ModelManager("s", [], on_status=lambda name, st: reports.append((name, st)))
        m.set_placements({"a": spec("a")})
        await settle(m, lambda: m.get("a") is not None)
        engine = m.get("a")
        m.set_placements({})
        await m.reconcile()
        # Not advertised (status withdrawn), but still loaded: a request that arrives late
        # from a router whose watch lags is answered, not refused with NOT_FOUND.
        assert "a" not in m.ready_models() and reports[-1] == ("a", None)
        assert m.get("a") is engine
        m.set_placements({"a": spec("a")})
        await m.reconcile()
        assert m.get("a") is engine  # the same loaded engine, no reload
        await m.stop()
    asyncio.run(go())


def test_memory_short_evicts_an_idle_released_model_first():
    async def go():
        m = ModelManager("s", [], memory_budget=100 * MB)
        m.set_placements({"a": spec("a", 60 * MB)})
        await settle(m, lambda: m.get("a") is not None)
        m.set_placements({"b": spec("b", 60 * MB)})  # a released, b needs its memory
        await settle(m, lambda: m.get("b") is not None)
        assert "a" not in m.models
        assert m.memory_used() == 60 * MB
        await m.stop()
    asyncio.run(go())


def test_not_enough_memory_is_a_reported_failure_not_a_crash():
    async def go():
        reports: dict = {}
        m = ModelManager("s", [], memory_budget=100 * MB,
                         on_status=lambda name, st: reports.__setitem__(name, st))
        m.set_placements({"a": spec("a", 60 * MB), "b": spec("b", 60 * MB)})
        await settle(m, lambda: m.get("a") is not None or m.get("b") is not None)
        await m.reconcile()
        failed = [st for st in reports.values() if st and st.state == cp.MODEL_STATE_FAILED]
        assert len(failed) == 1 and "not enough memory" in failed[0].reason
        await m.stop()
    asyncio.run(go())


def test_load_failure_is_reported_with_reason_and_kept_for_the_backoff():
    async def go():
        reports: dict = {}
        m = ModelManager("s", [], failure_backoff_s=0.2,
                         on_status=lambda name, st: reports.__setitem__(name, st))
        m.set_placements({"bad": spec("bad", nonsense_option=1)})
        await settle(m, lambda: reports.get("bad") is not None
                     and reports["bad"].state == cp.MODEL_STATE_FAILED)
        assert "nonsense_option" in reports["bad"].reason
        # Still wanted: the report stays (the leader moves the model elsewhere).
        await m.reconcile()
        assert reports["bad"].state == cp.MODEL_STATE_FAILED
        # Withdrawn: the report is kept for the back-off, then dropped.
        m.set_placements({})
        await m.reconcile()
        assert "bad" in m.models
        await settle(m, lambda: "bad" not in m.models)
        assert reports["bad"] is None
        await m.stop()
    asyncio.run(go())
