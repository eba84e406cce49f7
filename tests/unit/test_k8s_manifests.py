"""deploy/k8s: every overlay renders with `kubectl kustomize`, every object is accepted by the
Kubernetes API schemas (kubernetes-validate, strict: unknown fields are errors), and the
deployment has what the issue asks for. tests/e2e/test_k8s_loopback.py runs the commands."""

from __future__ import annotations

import functools

import kubernetes_validate
import pytest
from kubernetes_validate.utils import SchemaNotFoundError

from services.cli.meshserve import build_parser
from tests.helpers import REPO
from tests.k8s_pods import Loopback, expand, render

OVERLAYS = ["cpu-dev", "gpu-trtllm"]
#: The newest API the package knows (the GPU overlay reads node zones from pod labels, which
#: Kubernetes copies onto pods from 1.35 on).
VERSIONS = [kubernetes_validate.utils.latest_version()]
MESHSERVE = {"meshserve-controlplane", "meshserve-router", "meshserve-modelserver", "meshserve-envoy",
             "meshserve-openai-gateway"}


@functools.cache
def objects(overlay: str) -> list[dict]:
    return render(overlay)


def by_kind(overlay: str, kind: str) -> dict[str, dict]:
    return {o["metadata"]["name"]: o for o in objects(overlay) if o["kind"] == kind}


def _check_monitor(obj: dict) -> None:
    """Prometheus Operator kinds have no schema in kubernetes-validate: the fields we use."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj["metadata"]["name"]
    spec = obj["spec"]
    assert spec["selector"]["matchLabels"]
    endpoints = spec.get("endpoints") or spec.get("podMetricsEndpoints")
    assert endpoints and all(isinstance(e["port"], str) for e in endpoints)
    for e in endpoints:
        for r in e.get("relabelings", []):
            assert set(r) <= {"sourceLabels", "targetLabel", "replacement", "regex", "action"}, r


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_is_valid(overlay):
    for obj in objects(overlay):
        assert obj["metadata"].get("namespace", "meshserve") == "meshserve" or obj["kind"] == "Namespace"
        for version in VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except SchemaNotFoundError:
                _check_monitor(obj)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(map(str, exc.path))
                pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} ({version}): {path}: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_deployment_has_every_part(overlay):
    workloads = {**by_kind(overlay, "Deployment"), **by_kind(overlay, "StatefulSet")}
    assert by_kind(overlay, "StatefulSet")["meshserve-etcd"]["spec"]["replicas"] == 3
    assert workloads["meshserve-controlplane"]["spec"]["replicas"] == 2
    assert set(workloads) == MESHSERVE | {"meshserve-etcd"}
    assert by_kind(overlay, "HorizontalPodAutoscaler")["meshserve-router"]["spec"]["scaleTargetRef"]["name"] \
        == "meshserve-router"
    pdbs = by_kind(overlay, "PodDisruptionBudget").values()
    policies = by_kind(overlay, "NetworkPolicy")
    assert policies["default-deny-ingress"]["spec"]["podSelector"] == {}
    monitors = {o["metadata"]["name"] for o in objects(overlay) if o["kind"] in ("ServiceMonitor", "PodMonitor")}
    for name, w in workloads.items():
        labels = w["spec"]["template"]["metadata"]["labels"]
        assert any(p["spec"]["selector"]["matchLabels"].items() <= labels.items() for p in pdbs), f"{name}: no PDB"
        assert any(p["spec"]["podSelector"].get("matchLabels", {}).items() <= labels.items()
                   for n, p in policies.items() if n != "default-deny-ingress"), f"{name}: no NetworkPolicy"
        assert name in monitors, f"{name}: not scraped"
        (container,) = w["spec"]["template"]["spec"]["containers"]
        assert "readinessProbe" in container and "livenessProbe" in container, name
        assert container["resources"]["requests"], name
        if name in MESHSERVE - {"meshserve-envoy"}:
            assert "grpc" in container["readinessProbe"], f"{name}: MeshServe services are probed over gRPC"


def test_gpu_model_servers_are_on_gpu_nodes_spread_across_zones():
    pod = by_kind("gpu-trtllm", "Deployment")["meshserve-modelserver"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].startswith("meshserve/meshserve-trtllm:")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    zone = next(t for t in pod["topologySpreadConstraints"] if t["topologyKey"] == "topology.kubernetes.io/zone")
    assert zone["whenUnsatisfiable"] == "DoNotSchedule"
    assert {v["name"]: v for v in pod["volumes"]}["models"] == {
        "name": "models", "persistentVolumeClaim": {"claimName": "meshserve-models", "readOnly": True}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_meshserve_command_lines_parse(overlay, tmp_path):
    """Every MeshServe container's command line is one the CLI accepts (the GPU overlay's
    included, which cannot run here)."""
    loopback = Loopback(objects(overlay), tmp_path)
    parser = build_parser()
    for name in MESHSERVE:
        (pod,) = loopback.add_pods(name, 1)
        env = loopback.env(pod)
        words = [expand(w, env) for w in [*pod.container["command"], *pod.container["args"]]]
        assert words[0] == "meshserve", name
        assert "$(" not in " ".join(words), f"{name}: unresolved variable in {words}"
        parser.parse_args(words[1:])


def test_every_image_has_a_dockerfile():
    images = {c["image"].rsplit(":", 1)[0] for overlay in OVERLAYS for o in objects(overlay)
              if o["kind"] in ("Deployment", "StatefulSet") for c in o["spec"]["template"]["spec"]["containers"]}
    ours = {i for i in images if i.startswith("meshserve/")}
    assert ours == {"meshserve/meshserve", "meshserve/meshserve-trtllm"}
    for image in ours:
        assert (REPO / "deploy" / "docker" / f"{image.split('/')[1]}.Dockerfile").is_file(), image
