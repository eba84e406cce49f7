"""Model servers meet placement records written around the control plane (no control plane runs
here: the test writes etcd as a hand edit or a buggy leader would). Each bad record fails its own
model, reported FAILED with the reason on its status key; every server starts, stays up (same
PIDs) and serves its other models through Envoy."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.common import keyspace
from services.common.etcd_client import EtcdClient
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.conftest import wait_for

pytestmark = pytest.mark.e2e

SERVERS = ("p1", "p2")


def placement(name: str, backend: str = "sim", source: str = "", **options: str) -> bytes:
    spec = cp.ModelSpec(name=name, backend=backend, source=source, options=options, generation=1)
    return keyspace.encode(cp.Placement(spec=spec))


#: model -> (record, what its FAILED reason must say)
BAD = {
    "junk": (b"\xff\xff\xff\xff", "cannot be decoded"),
    "poison": (placement("poison", **{"": "x"}), "empty name"),
    "zero": (placement("zero", tokens_per_second="0"), "tokens_per_second=0"),
    "cobol": (placement("cobol", backend="cobol"), "unknown backend"),
    "alias": (placement("ok"), "names model 'ok'"),
    "hostpath": (placement("hostpath", backend="torch", source="/etc/passwd"), "host path"),
    "typo": (placement("typo", tokens_per_secnd="5"), "unknown engine option"),
}


def records_for(sid: str) -> dict[str, bytes]:
    prefix = keyspace.placement_prefix(sid)
    out = {prefix + model: value for model, (value, _) in BAD.items()}
    out[prefix + "ok"] = placement("ok")
    out[prefix + "bad name"] = placement("bad name")  # no status key possible: logged, skipped
    return out


def etcd_call(endpoints: str, work):
    async def go():
        client = EtcdClient(endpoints)
        try:
            return await work(client)
        finally:
            await client.close()
    return asyncio.run(go())


def etcd_put(endpoints: str, puts: dict[str, bytes]) -> None:
    async def work(client: EtcdClient) -> None:
        for key, value in puts.items():
            await client.put(key, value)
    etcd_call(endpoints, work)


def statuses(endpoints: str) -> dict[tuple[str, str], cp.ModelStatus]:
    async def work(client: EtcdClient):
        items, _ = await client.get_prefix(keyspace.STATUS)
        return items
    decoded = {keyspace.split_pair(keyspace.STATUS, k): keyspace.decode(cp.ModelStatus, v)
               for k, v in etcd_call(endpoints, work).items()}
    return {pair: status for pair, status in decoded.items() if status is not None}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    """Bad records are in etcd before the servers start: a (re)start must not fail on them."""
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("bad-records"), base_port=0, lease_ttl=3,
                    controlplanes=0,
                    servers=[ServerPlan(sid, engine_options=["tokens_per_second=500"])
                             for sid in SERVERS])
    m = LocalMesh(plan)
    try:
        m.ports.check()
        m.start_etcd()
        for sid in SERVERS:
            etcd_put(m.etcd_endpoints, records_for(sid))
        for server in plan.servers:
            m.start_server(server)
        m.start_router(0)
        m.start_envoy()
        yield m
    finally:
        m.stop()
        for name, child in m.children.items():
            assert not child.alive(), f"{name} (pid {child.pid}) survived the mesh stop"


@pytest.fixture(scope="module")
def api(mesh):
    with grpc.insecure_channel(mesh.envoy) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def ask(api, model: str) -> inference_pb2.GenerateResponse:
    req = inference_pb2.GenerateRequest(model=model, prompt="one two three")
    req.sampling.max_tokens = 3
    return api.Generate(req, timeout=30)


def settled(endpoints: str) -> bool:
    seen = statuses(endpoints)
    for sid in SERVERS:
        ok = seen.get((sid, "ok"))
        if ok is None or ok.state != cp.MODEL_STATE_READY:
            return False
        if any(seen.get((sid, m)) is None for m in BAD):
            return False
    return True


def test_each_bad_record_fails_its_model_and_every_server_serves_the_rest(mesh, api):
    pids = mesh.pids()
    wait_for(lambda: settled(mesh.etcd_endpoints), 60, "every record reported on")
    seen = statuses(mesh.etcd_endpoints)
    for sid in SERVERS:
        for model, (_, words) in BAD.items():
            status = seen[(sid, model)]
            assert status.state == cp.MODEL_STATE_FAILED and words in status.reason, (sid, model)
        assert (sid, "bad name") not in seen
    served = {ask(api, "ok").served_by.server_id for _ in range(20)}
    assert served <= set(SERVERS) and served
    assert mesh.pids() == pids and all(ch.alive() for ch in mesh.children.values())


def test_records_going_bad_while_serving_fail_only_their_model(mesh, api):
    pids = mesh.pids()
    prefix = keyspace.placement_prefix("p1")
    etcd_put(mesh.etcd_endpoints, {prefix + "late": placement("late")})
    wait_for(lambda: (st := statuses(mesh.etcd_endpoints).get(("p1", "late"))) is not None
             and st.state == cp.MODEL_STATE_READY, 30, "a good model placed next to bad ones")
    etcd_put(mesh.etcd_endpoints, {prefix + "late": b"\x0a\xff"})  # corrupted in place
    wait_for(lambda: (st := statuses(mesh.etcd_endpoints).get(("p1", "late"))) is not None
             and st.state == cp.MODEL_STATE_FAILED and "cannot be decoded" in st.reason, 30,
             "the corrupted record reported")
    for _ in range(10):
        assert ask(api, "ok").usage.completion_tokens == 3
    with contextlib.suppress(grpc.RpcError):
        ask(api, "late")  # whatever the answer, nobody crashes
    assert mesh.pids() == pids and all(ch.alive() for ch in mesh.children.values())
