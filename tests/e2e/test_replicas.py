"""The replica - (server, model) - is the data plane's unit: one server holding the real SmolLM2
(torch) and a simulated model labels each answer by the model that produced it, and load on one
model does not shed the other."""

from __future__ import annotations

import threading

import grpc
import pytest
from meshserve.v1 import common_pb2, controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc
from meshserve.v1 import controlplane_pb2 as cp

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.conftest import running_mesh, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.model]

REAL, SIM = "smollm2", "echo"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("replicas"), base_port=0, lease_ttl=3,
                    servers=[ServerPlan("server-0", [f"{REAL}=torch:embedded"])])
    with running_mesh(plan) as m:
        ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(m.controlplane))
        spec = cp.ModelSpec(name=SIM, backend="sim", replicas=1,
                            options={"max_running": "1", "tokens_per_second": "5"})
        ctl.DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)
        yield m


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.envoy) as channel:
        s = inference_pb2_grpc.InferenceServiceStub(channel)
        wait_for(lambda: {m.name for m in s.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
                          if m.ready_replicas} == {REAL, SIM}, 60, "both models ready on server-0")
        yield s


def ask(model: str, text: str, max_tokens: int, **kw) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=model, **kw)
    req.messages.add(role="user", content=text)
    req.sampling.max_tokens = max_tokens
    return req


def test_answers_are_labelled_by_the_model_that_produced_them(stub):
    real = stub.Generate(ask(REAL, "What is the capital of France?", 16), timeout=60)
    sim = stub.Generate(ask(SIM, "one two", 2), timeout=60)
    assert real.served_by.server_id == sim.served_by.server_id == "server-0"
    assert "Paris" in real.text
    assert (real.served_by.backend, real.served_by.simulated) == ("torch", False)
    assert (sim.served_by.backend, sim.served_by.simulated) == ("sim", True)


def test_a_saturated_model_does_not_shed_its_neighbour(stub):
    """echo runs one sequence at a time: two long streams saturate it, so SHEDDABLE echo requests
    are shed, while SHEDDABLE requests for the real model on the same server are served."""
    streams = [stub.GenerateStream(ask(SIM, "slow words", 100), timeout=120) for _ in range(2)]

    def hold(stream) -> None:
        try:
            for _ in stream:
                pass
        except grpc.RpcError:
            pass  # cancelled at the end of the test
    holders = [threading.Thread(target=hold, args=(s,), daemon=True) for s in streams]
    for h in holders:
        h.start()
    try:
        def shed() -> bool:
            try:
                # A short deadline: one admitted before the load report arrived waits behind the streams.
                stub.Generate(ask(SIM, "x", 1, priority=common_pb2.PRIORITY_SHEDDABLE), timeout=2)
            except grpc.RpcError as exc:
                return exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            return False
        wait_for(shed, 30, "SHEDDABLE echo requests shed while echo is saturated")
        real = stub.Generate(ask(REAL, "Say hi.", 4, priority=common_pb2.PRIORITY_SHEDDABLE), timeout=60)
        assert real.served_by.backend == "torch" and real.token_ids
    finally:
        for s in streams:
            s.cancel()
        for h in holders:
            h.join(10)
