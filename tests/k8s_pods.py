"""Rendered Kubernetes manifests as processes on loopback, for the drift test.

Each pod's container runs with the exact command, args and environment of the manifest, resolved
as the kubelet would (downward API, ConfigMap keys, `$(VAR)` expansion). Only what a single host
cannot copy is translated: every (pod, container port) gets its own loopback port, so addresses
- `0.0.0.0:P`, the pod IP, `<pod>.<headless service>:P`, `<service>:P` - are rewritten to it;
volume mount paths become per-pod directories; `meshserve` and `etcd` are this checkout's. An
address naming nothing in the manifests fails the test: that is drift.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.localmesh import components as c
from tests.helpers import REPO

K8S = REPO / "deploy" / "k8s"
NAMESPACE = "meshserve"
_ADDRESS = re.compile(r"(?P<host>[A-Za-z0-9][A-Za-z0-9.\-]*):(?P<port>\d{2,5})\b")
_VAR = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def _made(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def render(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is needed to render deploy/k8s"
    out = subprocess.run([kubectl, "kustomize", str(K8S / "overlays" / overlay)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    return [o for o in yaml.safe_load_all(out) if o]


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: defined variables are replaced, `$$` escapes, others stay."""
    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))
    return _VAR.sub(one, text)


@dataclass
class Pod:
    name: str
    labels: dict[str, str]
    container: dict
    volumes: dict[str, Path] = field(default_factory=dict)

    def port_number(self, port: int | str) -> int:
        """A container port by number or by name."""
        if isinstance(port, int) or str(port).isdigit():
            return int(port)
        return next(p["containerPort"] for p in self.container.get("ports", []) if p["name"] == port)


class Loopback:
    """Pods of the rendered objects and the loopback ports that stand in for their addresses."""

    def __init__(self, objects: list[dict], root: Path) -> None:
        self.objects = objects
        self.root = root
        self.pods: dict[str, Pod] = {}
        self._ports: dict[tuple[str, int], int] = {}
        self.configmaps = {o["metadata"]["name"]: o.get("data", {}) for o in objects if o["kind"] == "ConfigMap"}
        self.services = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Service"}

    def workload(self, name: str) -> dict:
        return next(o for o in self.objects if o["kind"] in ("Deployment", "StatefulSet")
                    and o["metadata"]["name"] == name)

    def add_pods(self, workload: str, count: int) -> list[Pod]:
        """`count` pods of a Deployment or StatefulSet, named as a StatefulSet names them."""
        spec = self.workload(workload)["spec"]["template"]
        (container,) = spec["spec"]["containers"]
        out = []
        for i in range(count):
            name = f"{workload}-{i}"
            volumes = {v["name"]: self.root / name / v["name"] for v in spec["spec"].get("volumes", [])}
            for claim in self.workload(workload)["spec"].get("volumeClaimTemplates", []):
                volumes[claim["metadata"]["name"]] = self.root / name / claim["metadata"]["name"]
            pod = Pod(name, dict(spec["metadata"]["labels"]), container, volumes)
            self.pods[name] = pod
            out.append(pod)
        return out

    def port(self, pod: Pod, port: int | str) -> int:
        key = (pod.name, pod.port_number(port))
        if key not in self._ports:
            self._ports[key] = c.free_port()
        return self._ports[key]

    def address(self, pod: Pod, port: int | str) -> str:
        return f"127.0.0.1:{self.port(pod, port)}"

    # --- environment and command line -----------------------------------------------------------

    def env(self, pod: Pod) -> dict[str, str]:
        out: dict[str, str] = {}
        for var in pod.container.get("env", []):
            if "value" in var:
                out[var["name"]] = expand(str(var["value"]), out)
                continue
            source = var["valueFrom"]
            if "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                out[var["name"]] = self.configmaps[ref["name"]][ref["key"]]
            elif "fieldRef" in source:
                out[var["name"]] = self._field(pod, source["fieldRef"]["fieldPath"])
            else:
                raise AssertionError(f"{pod.name}: env {var['name']} has a source this test does not know")
        return out

    def _field(self, pod: Pod, path: str) -> str:
        if path == "metadata.name":
            return pod.name
        if path == "metadata.namespace":
            return NAMESPACE
        if path == "status.podIP":
            return "127.0.0.1"
        label = re.fullmatch(r"metadata\.labels\['(.+)'\]", path)
        if label:
            return pod.labels.get(label.group(1), "")
        raise AssertionError(f"{pod.name}: downward API field {path} is not known to this test")

    def argv(self, pod: Pod) -> list[str]:
        env = self.env(pod)
        words = [expand(w, env) for w in [*pod.container["command"], *pod.container.get("args", [])]]
        program = {"meshserve": str(Path(sys.executable).parent / "meshserve"),
                   "etcd": c.etcd_binary()}[words[0]]
        return [program, *(self._rewrite(pod, w) for w in words[1:])]

    def _rewrite(self, pod: Pod, word: str) -> str:
        mounts = {m["mountPath"]: pod.volumes[m["name"]] for m in pod.container.get("volumeMounts", [])}
        if mounts:  # one pass: a replaced path is never replaced again
            alternatives = "|".join(re.escape(m) for m in sorted(mounts, key=len, reverse=True))
            word = re.sub(f"(^|[=,])({alternatives})(?=/|$|,)",
                          lambda m: m.group(1) + str(_made(mounts[m.group(2)])), word)
        return _ADDRESS.sub(lambda m: self._resolve(pod, m.group("host"), int(m.group("port"))), word)

    def _resolve(self, pod: Pod, host: str, port: int) -> str:
        short = host.removesuffix(".svc.cluster.local").removesuffix(f".{NAMESPACE}").removesuffix(".svc")
        if short in ("0.0.0.0", "127.0.0.1", "localhost"):
            return self.address(pod, port)
        first, _, rest = short.partition(".")
        if rest in self.services and first in self.pods:  # <pod>.<headless service>
            return self.address(self.pods[first], port)
        if short in self.services:
            service = self.services[short]
            target = next(p.get("targetPort", p["port"]) for p in service["spec"]["ports"] if p["port"] == port)
            selector = service["spec"]["selector"]
            chosen = [p for p in self.pods.values() if all(p.labels.get(k) == v for k, v in selector.items())]
            assert chosen, f"{pod.name}: service {short} selects no started pod"
            return self.address(chosen[0], target)
        raise AssertionError(f"{pod.name}: {host}:{port} names no pod or service of the manifests")

    # --- readiness ------------------------------------------------------------------------------

    def ready_check(self, pod: Pod) -> Callable[[], bool]:
        """The container's readiness probe, pointed at the pod's loopback ports."""
        probe = pod.container["readinessProbe"]
        if "grpc" in probe:
            address = self.address(pod, probe["grpc"]["port"])
            service = probe["grpc"].get("service", "")
            return lambda: c.grpc_serving(address, service)
        if "httpGet" in probe:
            url = f"http://{self.address(pod, probe['httpGet']['port'])}{probe['httpGet']['path']}"
            return lambda: urllib.request.urlopen(url, timeout=1).status == 200
        raise AssertionError(f"{pod.name}: readiness probe kind not known to this test: {probe}")
