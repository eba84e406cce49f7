"""A model server meets bad placement records: each fails its own model (reported FAILED with the
reason), never the server or its other models. Also: retries by load generation, sources from the
model directories, per-model backend in the status, and late requests to a released model."""

from __future__ import annotations

import asyncio

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace
from services.modelserver.manager import ModelManager

FAILED, READY = cp.MODEL_STATE_FAILED, cp.MODEL_STATE_READY


def record(name: str, server="s", backend="sim", generation=1, **options) -> bytes:
    spec = cp.ModelSpec(name=name, backend=backend, generation=generation)
    for k, v in options.items():
        spec.options[k] = str(v)
    return keyspace.encode(cp.Placement(server_id=server, spec=spec))


def key(model: str) -> str:
    return keyspace.placement_prefix("s") + model


async def settle(manager: ModelManager, condition, rounds=200) -> None:
    for _ in range(rounds):
        await manager.reconcile()
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("manager did not settle")


def reporter() -> tuple[dict[str, cp.ModelStatus], ModelManager]:
    reports: dict[str, cp.ModelStatus] = {}
    m = ModelManager("s", [], on_status=lambda name, st: reports.__setitem__(name, st or cp.ModelStatus()))
    return reports, m


async def test_bad_records_fail_their_model_and_the_rest_is_served():
    reports, m = reporter()
    good_status = keyspace.encode(cp.Placement(server_id="s", spec=cp.ModelSpec(name="good")))
    records = {
        key("good"): good_status,
        key("corrupt"): b"\xff\xff\xff",
        key("empty"): keyspace.encode(cp.Placement(server_id="s", spec=cp.ModelSpec())),
        key("alias"): record("good"),
        key("cobol"): record("cobol", backend="cobol"),
        key("poison"): record("poison", **{"": "x"}),
        key("zero"): record("zero", tokens_per_second=0),
        key("hostpath"): keyspace.encode(cp.Placement(spec=cp.ModelSpec(
            name="hostpath", backend="torch", source="/etc/passwd"))),
        key("elsewhere"): record("elsewhere", server="s2"),
        key("bad name"): record("bad name"),
        keyspace.placement_prefix("s") + "../x": record("x"),
    }
    m.follow(records)
    await settle(m, lambda: m.get("good") is not None)
    await m.reconcile()
    expected = {"corrupt": "cannot be decoded", "empty": "names no model", "alias": "names model",
                "cobol": "unknown backend", "poison": "empty name", "zero": "tokens_per_second=0",
                "hostpath": "not a host path", "elsewhere": "addressed to server 's2'"}
    for model, words in expected.items():
        status = reports[model]
        assert status.state == FAILED and words in status.reason, model
    assert "bad name" not in reports and "../x" not in reports  # no valid status key: logged
    assert m.ready_models() == ["good"]
    await m.stop()


async def test_a_new_generation_retries_a_failed_load_but_not_a_ready_one(tmp_path):
    reports, m = reporter()
    m.model_dirs = [str(tmp_path)]
    torch_missing = cp.ModelSpec(name="t", backend="torch", source="w.gguf", generation=1)
    m.set_placements({"t": torch_missing, "ok": cp.ModelSpec(name="ok", generation=1)})
    await settle(m, lambda: m.get("ok") is not None and reports.get("t") is not None
                 and reports["t"].state == FAILED)
    assert "not found in the model directories of server s" in reports["t"].reason
    assert reports["t"].generation == 1 and reports["t"].backend == "torch"
    engine = m.get("ok")
    torch_missing.generation = 2
    m.set_placements({"t": torch_missing, "ok": cp.ModelSpec(name="ok", generation=2)})
    await m.reconcile()
    assert reports["t"].generation == 2 and reports["t"].state == FAILED  # tried again
    assert m.get("ok") is engine and reports["ok"].generation == 2  # kept, status follows
    await m.stop()


async def test_a_changed_spec_loads_again_even_when_released():
    reports, m = reporter()
    m.set_placements({"a": cp.ModelSpec(name="a", generation=1)})
    await settle(m, lambda: m.get("a") is not None)
    first = m.get("a")
    m.set_placements({})
    await m.reconcile()
    changed = cp.ModelSpec(name="a", generation=5)
    changed.options["tokens_per_second"] = "50"
    m.set_placements({"a": changed})
    await settle(m, lambda: m.get("a") is not None and m.get("a") is not first)
    assert m.get("a").config.tokens_per_second == 50.0  # type: ignore[union-attr]
    await m.stop()


async def test_status_says_backend_and_simulated_per_model():
    reports, m = reporter()
    m.set_placements({"a": cp.ModelSpec(name="a")})
    await settle(m, lambda: m.get("a") is not None)
    status = reports["a"]
    assert (status.backend, status.simulated) == ("sim", True)
    await m.stop()


async def test_server_defaults_apply_only_where_the_backend_knows_them():
    reports: dict = {}
    m = ModelManager("s", [], on_status=lambda n, st: reports.__setitem__(n, st),
                     default_options={"threads": 2, "tokens_per_second": 1000})
    m.set_placements({"a": cp.ModelSpec(name="a")})
    await settle(m, lambda: m.get("a") is not None)
    assert m.get("a").config.tokens_per_second == 1000.0  # type: ignore[union-attr]
    await m.stop()
