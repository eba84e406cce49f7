"""Reliability of the data plane on real processes: a hung server's streams move within seconds,
streams survive a router's death (clients resume), scaling down under load never answers
NOT_FOUND, and undecodable requests get INVALID_ARGUMENT on every service.

Sim engine (labelled simulated): output token i depends only on the prompt and i, so every
answer's exact text is known and lost or duplicated tokens show.
"""

from __future__ import annotations

import functools
import signal
import threading

import grpc
import pytest
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc

from services.client import resumable
from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.conftest import running_mesh, wait_for

pytestmark = pytest.mark.e2e

MODEL = "echo"
SCALED = "scaled"


def ask(prompt: str, max_tokens: int, **kw) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=MODEL, prompt=prompt, **kw)
    req.sampling.max_tokens = max_tokens
    return req


def sim_text(prompt: str, n: int) -> str:
    words = prompt.split()
    return " ".join(words[i % len(words)] for i in range(n))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    opts = ["tokens_per_second=20"]
    plan = MeshPlan(
        data_dir=tmp_path_factory.mktemp("reliability"), base_port=0, lease_ttl=3, routers=2,
        router_args=["--hang-timeout", "2"],
        servers=[ServerPlan(f"server-{i}", [f"{MODEL}=sim"], engine_options=opts) for i in range(3)])
    with running_mesh(plan) as m:
        yield m


@pytest.fixture(scope="module")
def stub(mesh):
    with grpc.insecure_channel(mesh.envoy) as channel:
        s = inference_pb2_grpc.InferenceServiceStub(channel)
        wait_for(lambda: s.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models[0].ready_replicas == 3,
                 30, "three ready servers")
        yield s


class Reader(threading.Thread):
    """Reads one stream (resuming as a client should) and keeps everything it received."""

    def __init__(self, stub, request: inference_pb2.GenerateRequest, resume: bool = True) -> None:
        super().__init__(daemon=True)
        self.stub, self.request, self.resume = stub, request, resume
        self.chunks: list[inference_pb2.GenerateResponse] = []
        self.error: grpc.RpcError | None = None
        self.first = threading.Event()

    def run(self) -> None:
        try:
            it = (resumable.stream(self.stub, self.request, timeout=90) if self.resume
                  else self.stub.GenerateStream(self.request, timeout=90))
            for chunk in it:
                self.chunks.append(chunk)
                self.first.set()
        except grpc.RpcError as exc:
            self.error = exc
        finally:
            self.first.set()

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks)

    @property
    def finished(self) -> bool:
        return bool(self.chunks) and bool(self.chunks[-1].finish_reason)


def start_readers(stub, n: int, tag: str, prompt: str, tokens: int) -> list[Reader]:
    readers = [Reader(stub, ask(prompt, tokens, session_id=f"{tag}-{i}")) for i in range(n)]
    for r in readers:
        r.start()
    for r in readers:
        assert r.first.wait(30), "no first chunk"
    return readers


def check_exact(readers: list[Reader], prompt: str, tokens: int) -> None:
    for r in readers:
        assert r.error is None, r.error
        assert r.finished and r.text == sim_text(prompt, tokens)
        assert len([t for c in r.chunks for t in c.token_ids]) == tokens  # none lost, none twice
        assert r.chunks[-1].usage.completion_tokens == tokens


def test_a_hung_servers_streams_move_within_seconds(mesh, stub):
    """SIGSTOP: the process holds its lease and sockets but sends nothing. Its load stream goes
    silent, routers abandon its attempts after --hang-timeout (2 s) and migrate them, long before
    the 30 s stall timeout."""
    prompt, tokens = "one two three four five", 120  # 6 s at 20 tokens/s
    readers = start_readers(stub, 6, "hang", prompt, tokens)
    victims = {c.served_by.server_id for r in readers for c in r.chunks[:1]}
    victim = sorted(victims)[0]
    child = mesh.children[victim]
    child.proc.send_signal(signal.SIGSTOP)
    try:
        on_victim = [r for r in readers if r.chunks[0].served_by.server_id == victim]
        # Far below the 30 s stall timeout: only hang detection can finish them this fast.
        wait_for(lambda: all(r.finished or r.error for r in on_victim), 20,
                 "streams of the hung server to finish elsewhere")
        for r in on_victim:
            assert r.chunks[-1].served_by.server_id != victim
    finally:
        child.proc.send_signal(signal.SIGCONT)
    for r in readers:
        r.join(60)
    check_exact(readers, prompt, tokens)
    wait_for(lambda: stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models[0].ready_replicas == 3,
             30, "the resumed server back in rotation")


def test_streams_survive_a_router_sigkill_by_resuming(mesh, stub):
    prompt, tokens = "red green blue", 80  # 4 s
    readers = start_readers(stub, 6, "router", prompt, tokens)
    routers = {r.chunks[0].served_by.router_id for r in readers}
    victim = sorted(routers)[0]
    mesh.sup.kill(mesh.children[victim])
    for r in readers:
        r.join(60)
    check_exact(readers, prompt, tokens)
    moved = [r for r in readers if r.chunks[0].served_by.router_id == victim]
    assert moved and all(r.chunks[-1].served_by.router_id != victim for r in moved)
    index = int(victim.removeprefix("router"))
    mesh.start_router(index)  # back on its port for the tests that follow


def test_without_resume_a_router_death_is_a_transport_error_the_client_can_retry(mesh, stub):
    """What a client without the helper sees: never OK with a truncated answer, and a status the
    resume helper treats as resumable."""
    prompt, tokens = "up down", 60
    readers = [Reader(stub, ask(prompt, tokens, session_id=f"raw-{i}"), resume=False) for i in range(4)]
    for r in readers:
        r.start()
    for r in readers:
        assert r.first.wait(30)
    victim = sorted({r.chunks[0].served_by.router_id for r in readers})[0]
    mesh.sup.kill(mesh.children[victim])
    for r in readers:
        r.join(60)
    broken = [r for r in readers if r.chunks[0].served_by.router_id == victim]
    for r in broken:
        assert r.error is not None and not r.finished
        assert resumable.resumable(r.error.code(), r.error.details() or ""), r.error
    mesh.start_router(int(victim.removeprefix("router")))


def ready(stub, model: str) -> int:
    models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
    return next((m.ready_replicas for m in models if m.name == model), 0)


def has_ready(stub, model: str, n: int) -> bool:
    return ready(stub, model) == n


def test_scaling_down_under_load_never_answers_not_found(mesh, stub):
    ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.controlplane))
    spec = cp.ModelSpec(name=SCALED, backend="sim", replicas=3, options={"tokens_per_second": "500"})
    ctl.DeployModel(cp.DeployModelRequest(spec=spec), timeout=10)
    wait_for(lambda: ready(stub, SCALED) == 3, 60, "three replicas of the scaled model")
    errors: list[str] = []
    done = threading.Event()

    def load() -> None:
        n = 0
        while not done.is_set() and n < 2000:
            n += 1
            req = inference_pb2.GenerateRequest(model=SCALED, prompt="a b c")
            req.sampling.max_tokens = 3
            try:
                stub.Generate(req, timeout=30)
            except grpc.RpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

    workers = [threading.Thread(target=load, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        for replicas in (1, 3, 2, 3, 1):
            ctl.ScaleModel(cp.ScaleModelRequest(name=SCALED, replicas=replicas), timeout=10)
            wait_for(functools.partial(has_ready, stub, SCALED, replicas), 60, f"{replicas} ready replica(s)")
    finally:
        done.set()
        for w in workers:
            w.join(60)
    assert not errors, errors[:5]


@pytest.mark.parametrize("payload", [b"\x0a\x02\xff\xfe", b"\xff\xff\xff\xff"])
def test_undecodable_requests_get_invalid_argument_on_every_service(mesh, payload):
    targets = [(mesh.envoy, "/meshserve.v1.InferenceService/Generate"),
               (mesh.routers[1], "/meshserve.v1.InferenceService/GenerateStream"),
               (mesh.routers[1], "/inference.GRPCInferenceService/ModelInfer"),
               (mesh.servers["server-2"], "/meshserve.v1.ModelServerService/Generate"),
               (mesh.controlplane, "/meshserve.v1.ControlPlaneService/DeployModel")]
    for address, method in targets:
        with grpc.insecure_channel(address) as ch:
            call = ch.unary_unary(method) if "Stream" not in method else ch.unary_stream(method)
            with pytest.raises(grpc.RpcError) as info:
                result = call(payload, timeout=10)
                if "Stream" in method:
                    list(result)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (method, info.value)
            assert "could not be decoded" in info.value.details()
    for name, child in mesh.children.items():
        assert child.alive(), name
        assert "Traceback" not in child.log_tail(400), f"{name} logged a traceback"
