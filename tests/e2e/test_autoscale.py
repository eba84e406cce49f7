"""Autoscaling on real parts: a 3-member etcd, two control-plane replicas, sim model servers (two
running, one more the server pool may start), a router and Envoy, load through Envoy.

Tests run in file order against one mesh: bad settings, scaling up under load (the server pool
starts a server) and back down (it stops it), scale to zero and back while KEDA's protocol
watches, a version woken from zero through a split, and a leader change that keeps the decision.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator

import grpc
import pytest
from externalscaler import externalscaler_pb2 as es
from externalscaler import externalscaler_pb2_grpc
from meshserve.v1 import autoscale_pb2 as asp
from meshserve.v1 import autoscale_pb2_grpc, controlplane_pb2_grpc, inference_pb2, inference_pb2_grpc, traffic_pb2_grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import traffic_pb2 as tp
from prometheus_client.parser import text_string_to_metric_families

from services.localmesh.mesh import MeshPlan, ServerPlan
from services.localmesh.serverpool import PoolSettings, ServerPool
from tests.helpers import meshctl, metrics_text, running_mesh, wait_for

pytestmark = pytest.mark.e2e

MODEL = "echo"
KEDA_REF = es.ScaledObjectRef(name="echo-servers", namespace="llm", scalerMetadata={"model": MODEL})


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    servers = [ServerPlan(f"s{i}", zone=f"z{i}", extra_args=["--idle-unload-s", "600"])
               for i in range(3)]
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("autoscale"), base_port=0, lease_ttl=3,
                    etcd_members=3, controlplanes=2, servers=servers[:2],
                    standby_servers=servers[2:],
                    controlplane_args=["--election-ttl", "2", "--health-interval", "0.5"])
    with running_mesh(plan) as m:
        stub = autoscale_pb2_grpc.AutoscaleServiceStub(grpc.insecure_channel(m.controlplane))
        pool = ServerPool(m, PoolSettings(2, 3, idle_s=2.0), lambda: stub.GetCapacity(
            asp.GetCapacityRequest(), timeout=2))
        stop = threading.Event()

        def steps() -> None:
            while not stop.wait(0.3):
                pool.step()
        runner = threading.Thread(target=steps, daemon=True)
        runner.start()
        m.pool = pool  # type: ignore[attr-defined]
        try:
            ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(m.controlplane))
            ctl.DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(
                name=MODEL, backend="sim", replicas=1,
                options={"max_running": "2", "tokens_per_second": "20"})), timeout=10)
            yield m
        finally:
            stop.set()
            runner.join(10)


def auto_stub(address: str) -> autoscale_pb2_grpc.AutoscaleServiceStub:
    return autoscale_pb2_grpc.AutoscaleServiceStub(grpc.insecure_channel(address))


@pytest.fixture(scope="module")
def auto(mesh):
    return [auto_stub(a) for a in mesh.controlplanes]


@pytest.fixture(scope="module")
def api(mesh):
    with grpc.insecure_channel(mesh.envoy) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)


def any_answers(stubs):
    for stub in stubs:
        with contextlib.suppress(grpc.RpcError):
            stub.GetAutoscale(asp.GetAutoscaleRequest(model=MODEL), timeout=2)
            return stub
    raise AssertionError("no control-plane replica answers")


def set_policy(stubs, **fields) -> asp.AutoscalePolicy:
    record = asp.AutoscalePolicy(model=MODEL, enabled=True, **fields)
    return any_answers(stubs).SetAutoscalePolicy(asp.SetAutoscalePolicyRequest(policy=record),
                                                 timeout=10).policy


def desired(stubs) -> int:
    return any_answers(stubs).GetAutoscale(asp.GetAutoscaleRequest(model=MODEL), timeout=5).state.desired_replicas


def ready(stubs) -> int:
    return any_answers(stubs).GetAutoscale(asp.GetAutoscaleRequest(model=MODEL), timeout=5).ready_replicas


def ask(text: str = "one two three", tokens: int = 30) -> inference_pb2.GenerateRequest:
    req = inference_pb2.GenerateRequest(model=MODEL, prompt=text)
    req.sampling.max_tokens = tokens
    return req


@contextlib.contextmanager
def load(api, clients: int) -> Iterator[list[str]]:
    """`clients` callers in a closed loop; yields the list of failures they met."""
    stop, failures = threading.Event(), []

    def caller() -> None:
        while not stop.is_set():
            try:
                api.Generate(ask(), timeout=60)
            except grpc.RpcError as exc:
                failures.append(exc.code().name)
    threads = [threading.Thread(target=caller, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield failures
    finally:
        stop.set()
        for t in threads:
            t.join(60)


@pytest.mark.parametrize("fields, words", [
    ({"min_replicas": 3, "max_replicas": 2}, "above max_replicas"),
    ({"min_replicas": 1, "max_replicas": 2, "stable_window_s": -10}, "stable_window_s"),
    ({"min_replicas": 1, "max_replicas": 2, "scale_down_cooldown_s": -1}, "scale_down_cooldown_s"),
    ({"min_replicas": 1, "max_replicas": 0}, "max_replicas"),
])
def test_bad_settings_are_invalid_argument(auto, fields, words):
    with pytest.raises(grpc.RpcError) as err:
        set_policy(auto, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_unknown_models_and_bad_budgets_are_refused_through_meshctl(mesh, auto):
    out = meshctl("--controlplane", mesh.controlplane, "autoscale", "set", "nosuch", "--max", "2")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "unknown model" in out.stderr
    out = meshctl("--controlplane", mesh.controlplane, "autoscale", "budgets", "set",
                  "--replicas", "local=-3")
    assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr
    out = meshctl("--controlplane", mesh.controlplane, "autoscale", "explain", "nosuch")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr


def test_load_scales_up_the_pool_adds_a_server_and_both_come_back_down(mesh, auto, api):
    set_policy(auto, min_replicas=1, max_replicas=3, stable_window_s=10, scale_down_cooldown_s=2)
    with load(api, clients=6) as failures:
        wait_for(lambda: desired(auto) == 3, 60, "three replicas wanted under load")
        wait_for(lambda: ready(auto) == 3, 90, "three replicas READY (the pool started s2)")
        assert mesh.pool.started >= 1 and "s2" in mesh.pool.running()
        explained = any_answers(auto).ExplainAutoscale(asp.ExplainAutoscaleRequest(model=MODEL),
                                                       timeout=5)
        assert explained.live and explained.recent and explained.recent[-1].to_replicas == 3
        assert "in flight" in explained.recent[0].reason
        out = meshctl("--controlplane", mesh.controlplane, "autoscale", "explain", MODEL)
        assert out.returncode == 0 and "desired 3" in out.stdout and "live numbers" in out.stdout
        # The leader's gauges: desired and READY replicas, and max_replicas as the binding limit.
        wait_for(lambda: leader_gauge(mesh, "meshserve_autoscaler_desired_replicas") == 3
                 and leader_gauge(mesh, "meshserve_autoscaler_actual_replicas") == 3
                 and leader_gauge(mesh, "meshserve_autoscaler_limit_binding", limit="max_replicas") == 1,
                 30, "the leader's autoscaler gauges")
    assert not failures, f"requests failed while scaling up: {failures}"
    text = "".join(metrics_text(mesh.metrics[f"controlplane{i}"]) for i in range(2))
    assert re.search(r'meshserve_autoscaler_decisions_total\{direction="up",model="echo",'
                     r'reason="(demand|panic)"\} [1-9]', text)
    wait_for(lambda: desired(auto) == 1, 90, "back to min once load stopped")
    wait_for(lambda: "s2" not in mesh.pool.running(), 60, "the pool stopping the idle server")


def leader_gauge(mesh, name: str, **labels: str) -> float:
    """The highest value of an echo series among the control-plane replicas (followers export none)."""
    found = [0.0]
    for i in range(2):
        for family in text_string_to_metric_families(metrics_text(mesh.metrics[f"controlplane{i}"])):
            found += [s.value for s in family.samples if s.name == name
                      and s.labels == {"model": MODEL, **labels}]
    return max(found)


def keda_watch(channel: grpc.Channel, seen: list[bool], stop: threading.Event) -> None:
    stub = externalscaler_pb2_grpc.ExternalScalerStub(channel)
    stream = stub.StreamIsActive(KEDA_REF)
    stop_watch = threading.Thread(target=lambda: (stop.wait(), stream.cancel()), daemon=True)
    stop_watch.start()
    with contextlib.suppress(grpc.RpcError):  # cancelled at the end
        seen.extend(answer.result for answer in stream)


def test_scale_to_zero_and_back_as_keda_sees_it(mesh, auto, api):
    channel = grpc.insecure_channel(mesh.controlplane)
    keda = externalscaler_pb2_grpc.ExternalScalerStub(channel)
    spec = keda.GetMetricSpec(KEDA_REF, timeout=5).metricSpecs[0]
    assert spec.targetSize == 1
    seen: list[bool] = []
    stop = threading.Event()
    watcher = threading.Thread(target=keda_watch, args=(channel, seen, stop), daemon=True)
    watcher.start()
    try:
        set_policy(auto, min_replicas=0, max_replicas=2, scale_to_zero=True, zero_grace_s=3,
                   stable_window_s=10, scale_down_cooldown_s=1)
        wait_for(lambda: desired(auto) == 0 and ready(auto) == 0, 90, "scaled to zero")
        wait_for(lambda: seen and seen[-1] is False, 10, "StreamIsActive to say inactive")
        metrics = keda.GetMetrics(es.GetMetricsRequest(scaledObjectRef=KEDA_REF,
                                                       metricName=spec.metricName), timeout=5)
        assert metrics.metricValues[0].metricValue == 0
        assert not keda.IsActive(KEDA_REF, timeout=5).result
        # A request now waits in the router while the leader places a replica, then is served.
        answer = api.Generate(ask("wake up", 3), timeout=60)
        assert answer.text == "wake up wake"
        wait_for(lambda: seen[-1] is True, 10, "StreamIsActive to say active again")
        assert keda.IsActive(KEDA_REF, timeout=5).result
        assert desired(auto) >= 1
        router_metrics = metrics_text(mesh.metrics["router0"])
        assert re.search(r'meshserve_router_activation_wait_seconds_count\{model="echo"\} [1-9]',
                         router_metrics)
    finally:
        stop.set()
        watcher.join(10)
        channel.close()


@pytest.mark.parametrize("metadata, code", [({}, grpc.StatusCode.INVALID_ARGUMENT),
                                             ({"model": "nosuch"}, grpc.StatusCode.NOT_FOUND),
                                             ({"model": "bad name!"}, grpc.StatusCode.INVALID_ARGUMENT)])
def test_keda_triggers_naming_no_deployed_model_are_refused(mesh, metadata, code):
    with grpc.insecure_channel(mesh.controlplane) as channel:
        keda = externalscaler_pb2_grpc.ExternalScalerStub(channel)
        ref = es.ScaledObjectRef(name="servers", namespace="llm", scalerMetadata=metadata)
        for call in (keda.IsActive, keda.GetMetricSpec,
                     lambda r, timeout: keda.GetMetrics(es.GetMetricsRequest(scaledObjectRef=r), timeout=timeout)):
            with pytest.raises(grpc.RpcError) as err:
                call(ref, timeout=5)
            assert err.value.code() == code, err.value.details()


def test_meshctl_sets_a_version_to_zero_and_a_split_wakes_it(mesh, auto, api):
    """A NAME@VERSION deployment autoscales on its own; a request for a split over it (traffic
    policy) counts as that version's demand and waits for it from zero."""
    channel = grpc.insecure_channel(mesh.controlplane)
    ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(channel)
    traffic = traffic_pb2_grpc.TrafficServiceStub(channel)
    ctl.DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(name="tw@v1", backend="sim", replicas=1)),
                    timeout=10)
    traffic.SetTrafficPolicy(tp.SetTrafficPolicyRequest(policy=tp.TrafficPolicy(name="tw", split=tp.SplitPolicy(
        targets=[tp.WeightedTarget(target="tw@v1", weight=100)]))), timeout=10)
    try:
        out = meshctl("--controlplane", mesh.controlplane, "autoscale", "set", "tw@v1", "--max", "1",
                      "--scale-to-zero", "on", "--zero-grace-s", "2", "--stable-window-s", "10")
        assert out.returncode == 0 and "0-1 replicas" in out.stdout, out.stderr
        out = meshctl("--controlplane", mesh.controlplane, "autoscale", "set", "tw", "--max", "1")
        assert out.returncode == 1 and "INVALID_ARGUMENT" in out.stderr and "traffic policy" in out.stderr
        out = meshctl("--controlplane", mesh.controlplane, "autoscale", "get", "tw@v1")
        assert out.returncode == 0 and re.search(r"scale_to_zero\s+yes", out.stdout), out.stdout

        def version_state() -> asp.GetAutoscaleResponse:
            return any_answers(auto).GetAutoscale(asp.GetAutoscaleRequest(model="tw@v1"), timeout=5)
        wait_for(lambda: (g := version_state()).state.desired_replicas == 0 and g.ready_replicas == 0,
                 90, "the version scaled to zero")
        req = inference_pb2.GenerateRequest(model="tw", prompt="wake the version")
        req.sampling.max_tokens = 2
        answer = api.Generate(req, timeout=60)
        assert (answer.text, answer.served_by.route) == ("wake the", "tw[split]>tw@v1")
        assert version_state().state.desired_replicas == 1
    finally:
        traffic.DeleteTrafficPolicy(tp.DeleteTrafficPolicyRequest(name="tw"), timeout=10)
        ctl.UndeployModel(cp.UndeployModelRequest(name="tw@v1"), timeout=10)
        channel.close()


def test_a_new_leader_keeps_the_decision(mesh, auto, api):
    # No panic mode (it also holds replicas): what keeps them here is the new leader's rule.
    set_policy(auto, min_replicas=1, max_replicas=3, stable_window_s=60, panic_threshold=100)
    with load(api, clients=6):
        wait_for(lambda: desired(auto) >= 2, 60, "more replicas under load")
    before = desired(auto)
    placed_before = wait_for(lambda: (n := any_answers(auto).GetAutoscale(
        asp.GetAutoscaleRequest(model=MODEL), timeout=5).placed_replicas) >= 2 and n, 30,
        "the decision's placements")
    leader = any_answers(auto).ExplainAutoscale(asp.ExplainAutoscaleRequest(model=MODEL),
                                                timeout=5).answered_by
    mesh.sup.kill(mesh.children[leader])
    survivor = auto[0] if leader == "controlplane1" else auto[1]

    def new_leader_answers() -> asp.ExplainAutoscaleResponse | None:
        e = survivor.ExplainAutoscale(asp.ExplainAutoscaleRequest(model=MODEL), timeout=5)
        return e if e.live and e.answered_by != leader else None
    explained = wait_for(new_leader_answers, 30, "the other replica to lead and autoscale")
    # Load stopped before the change: the new leader keeps the decision until it has watched a
    # full stable window itself, rather than dropping to what its empty windows suggest.
    assert explained.desired_replicas == before
    assert explained.state.last_scale_up_ms > 0 and "new leader" in explained.reason
    # Its first round (before it explained) placed with the kept decision: nothing was removed
    # (one more may be placed meanwhile, once the pool's server is up).
    placed = survivor.GetAutoscale(asp.GetAutoscaleRequest(model=MODEL), timeout=5).placed_replicas
    assert placed >= placed_before


def test_undeploying_removes_the_policy_and_a_new_deployment_starts_afresh(mesh, auto):
    alive = next(a for i, a in enumerate(mesh.controlplanes) if mesh.children[f"controlplane{i}"].alive())
    ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(alive))
    ctl.UndeployModel(cp.UndeployModelRequest(name=MODEL), timeout=10)
    ctl.DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(name=MODEL, backend="sim", replicas=1)),
                    timeout=10)
    got = any_answers(auto).GetAutoscale(asp.GetAutoscaleRequest(model=MODEL), timeout=5)
    assert not got.configured and not got.policy.enabled and not got.state.desired_replicas
