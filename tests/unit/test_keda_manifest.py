"""deploy/k8s/overlays/gpu-trtllm-keda: KEDA's ScaledObject points at the control plane's Service
and gRPC port, names a model the way the control plane's ExternalScaler reads it, scales the
model-server Deployment without smoothing of its own, and a NetworkPolicy lets KEDA's operator
in; every other object is valid Kubernetes (KEDA's kinds have no schema in kubernetes-validate)."""

from __future__ import annotations

import functools
from types import SimpleNamespace

import kubernetes_validate
import pytest
from externalscaler import externalscaler_pb2 as es
from kubernetes_validate.utils import SchemaNotFoundError

from services.controlplane.autoscaler.keda import METRIC_PREFIX, ExternalScalerServicer
from tests.k8s_pods import render

OVERLAY = "gpu-trtllm-keda"
#: keda.sh/v1alpha1 ScaledObject spec fields (a misspelt one would be dropped by the API server).
SCALED_OBJECT_FIELDS = {"scaleTargetRef", "pollingInterval", "cooldownPeriod", "initialCooldownPeriod",
                        "idleReplicaCount", "minReplicaCount", "maxReplicaCount", "fallback", "advanced",
                        "triggers"}


@functools.cache
def objects() -> list[dict]:
    return render(OVERLAY)


def one(kind: str, name: str) -> dict:
    (found,) = [o for o in objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def test_objects_are_valid_and_in_the_namespace():
    version = kubernetes_validate.utils.latest_version()
    for obj in objects():
        assert obj["metadata"].get("namespace", "meshserve") == "meshserve" or obj["kind"] == "Namespace"
        if obj["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except SchemaNotFoundError:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: no schema for {obj['apiVersion']}")


async def test_the_scaled_object_reaches_the_control_plane_and_names_a_model_it_reads():
    scaled = one("ScaledObject", "meshserve-modelserver")["spec"]
    assert set(scaled) <= SCALED_OBJECT_FIELDS, set(scaled) - SCALED_OBJECT_FIELDS
    assert one("Deployment", scaled["scaleTargetRef"]["name"])
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    behavior = scaled["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 0
    (trigger,) = scaled["triggers"]
    assert trigger["type"] in ("external", "external-push")
    metadata = dict(trigger["metadata"])
    host, port = metadata.pop("scalerAddress").rsplit(":", 1)
    service = one("Service", "meshserve-controlplane")
    assert host == f"{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local"
    assert int(port) == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    # The rest of the metadata is what KEDA sends as scalerMetadata: the control plane accepts it.
    model = metadata["model"]
    view = SimpleNamespace(models={model: object()})
    spec = await ExternalScalerServicer(view).GetMetricSpec(  # type: ignore[arg-type]
        es.ScaledObjectRef(name="meshserve-modelserver", namespace="meshserve", scalerMetadata=metadata), None)
    assert spec.metricSpecs[0].metricName == METRIC_PREFIX + model


def test_keda_may_dial_the_control_plane():
    policy = one("NetworkPolicy", "controlplane-keda")["spec"]
    pods = one("Deployment", "meshserve-controlplane")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pods.items()
    (rule,) = policy["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "keda"}}}]
    assert rule["ports"] == [{"port": 9001, "protocol": "TCP"}]
