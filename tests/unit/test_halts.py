"""Placement halts and records read back from etcd: pure functions of a MeshView, no etcd."""

from __future__ import annotations

from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import modelserver_pb2

from services.common import keyspace
from services.common.membership import MeshView
from services.controlplane import desired, halts
from services.controlplane.placement import ModelRequest, Server, plan

FAILED, READY = cp.MODEL_STATE_FAILED, cp.MODEL_STATE_READY


def view_with(servers=("s1", "s2", "s3")) -> MeshView:
    view = MeshView(client=None)  # type: ignore[arg-type]  # mirrors are never started here
    for sid in servers:
        view.servers[sid] = modelserver_pb2.ServerInfo(server_id=sid, region="r", zone=sid)
    return view


def deploy(view: MeshView, name="m", replicas=1, generation=7) -> cp.ModelSpec:
    spec = cp.ModelSpec(name=name, backend="sim", replicas=replicas, generation=generation)
    view.models[name] = spec
    return spec


def fail(view: MeshView, sid: str, model="m", generation=7, reason="boom") -> None:
    view.statuses[(sid, model)] = cp.ModelStatus(server_id=sid, model=model, state=FAILED,
                                                 reason=reason, managed=True, generation=generation)


def apply(view: MeshView, puts: dict[str, bytes], deletes: list[str]) -> None:
    """What the watch would do with the leader's fenced write."""
    for key, value in puts.items():
        record = keyspace.decode(cp.LoadFailures, value)
        assert record is not None
        view.load_failures[keyspace.id_from_key(keyspace.LOAD_FAILURES, key)] = record
    for key in deletes:
        view.load_failures.pop(keyspace.id_from_key(keyspace.LOAD_FAILURES, key), None)


def step(view: MeshView, halt_after=2) -> None:
    models, _ = desired.split_models(view)
    apply(view, *halts.changes(view, halts.updated(view, models, halt_after)))


def test_failures_on_distinct_servers_accumulate_then_halt():
    view = view_with()
    spec = deploy(view)
    fail(view, "s1")
    step(view)
    assert [f.server_id for f in view.load_failures["m"].failures] == ["s1"]
    assert halts.halted(view.load_failures, spec) is None
    del view.statuses[("s1", "m")]  # its back-off ran out: the record remembers it anyway
    fail(view, "s2", reason="not found in the model directories of server s2")
    step(view)
    record = halts.halted(view.load_failures, spec)
    assert record is not None and [f.server_id for f in record.failures] == ["s1", "s2"]
    dep = desired.deployments(view)[0]
    assert dep.halted and "HALTED" in dep.unsatisfied_reason and "meshctl model retry m" in \
        dep.unsatisfied_reason and len(dep.failures) == 2
    assert desired.plan_for(view).placements["m"] == set()  # s3 is free, but nothing is placed


def test_a_halted_model_keeps_its_ready_replicas():
    view = view_with()
    deploy(view, replicas=3)
    view.placements[("s3", "m")] = cp.Placement(server_id="s3")
    view.statuses[("s3", "m")] = cp.ModelStatus(state=READY, managed=True, generation=7)
    fail(view, "s1")
    fail(view, "s2")
    step(view)
    assert desired.plan_for(view).placements["m"] == {"s3"}


def test_same_server_twice_counts_once_and_zero_disables():
    view = view_with()
    spec = deploy(view)
    fail(view, "s1")
    step(view)
    step(view)
    assert len(view.load_failures["m"].failures) == 1
    fail(view, "s2")
    step(view, halt_after=0)
    assert halts.halted(view.load_failures, spec) is None and len(view.load_failures["m"].failures) == 2


def test_a_new_generation_starts_afresh_and_old_failures_do_not_count():
    view = view_with()
    spec = deploy(view)
    fail(view, "s1")
    fail(view, "s2")
    step(view)
    assert halts.halted(view.load_failures, spec) is not None
    spec = deploy(view, generation=8)  # meshctl model retry
    assert halts.halted(view.load_failures, spec) is None
    assert desired.failed_from_view(view, {"m": spec}) == set()  # both may be tried again
    assert desired.plan_for(view).placements["m"]
    step(view)
    assert view.load_failures["m"].generation == 8 and not view.load_failures["m"].failures


def test_records_of_undeployed_models_are_deleted():
    view = view_with()
    deploy(view)
    fail(view, "s1")
    step(view)
    del view.models["m"]
    puts, deletes = halts.changes(view, halts.updated(view, {}, 2))
    assert not puts and deletes == ["/meshserve/loadfailures/m"]


def test_the_leader_plans_with_the_records_it_just_wrote():
    view = view_with()
    spec = deploy(view)
    fail(view, "s1")
    fail(view, "s2")
    records = halts.updated(view, {"m": spec}, 2)
    assert not view.load_failures  # its own watch has not delivered the write yet
    assert desired.plan_for(view).placements["m"] == {"s3"}
    assert desired.plan_for(view, records).placements["m"] == set()


def test_invalid_records_are_reported_and_never_placed():
    view = view_with()
    deploy(view, name="good")
    bad = deploy(view, name="bad")
    bad.options["tokens_per_second"] = "0"
    view.models["alias"] = cp.ModelSpec(name="good", backend="sim", replicas=1)
    view.servers["bad id"] = modelserver_pb2.ServerInfo(server_id="bad id")
    computed = desired.plan_for(view)
    assert set(computed.placements) == {"good"} and "bad id" not in computed.placements["good"]
    assert "invalid" in computed.unsatisfied["bad"] and "names model" in computed.unsatisfied["alias"]


def test_planner_places_nothing_new_for_a_halted_request():
    servers = [Server("a", "r", "z1"), Server("b", "r", "z2")]
    result = plan([ModelRequest("m", 2, halted=True)], servers, {"m": {"a"}})
    assert result.placements["m"] == {"a"}
