"""The dashboard and the Prometheus rules against a real Prometheus scraping the local mesh: every
dashboard expression, every recording rule and every series an alert reads returns data.

Prometheus is Debian's package, unpacked into .venv/bin by `make setup`; the test fails (never
skips) without it. The scrape configuration is services/localmesh/prometheus.py's, with the
same jobs and target labels as deploy/prometheus/prometheus.yml gives in Kubernetes."""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.localmesh import prometheus as local_prometheus
from services.localmesh.components import free_port
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from services.localmesh.processes import Supervisor
from tests.helpers import REPO, ask, meshctl, post_json, running_mesh, wait_for

pytestmark = pytest.mark.e2e

MODEL = "echo"
DASHBOARD = REPO / "deploy" / "grafana" / "meshserve.json"
#: Grafana's variables as a query over everything would resolve them.
VARIABLES = {"$__rate_interval": "30s", "$model": ".*", "$server": ".*"}


def prometheus_binary() -> str:
    found = shutil.which("prometheus", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert found, "no prometheus binary: `make setup` unpacks Debian's prometheus package into .venv/bin"
    return found


def query(address: str, expr: str) -> list[dict]:
    url = f"http://{address}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        body = json.loads(resp.read())
    assert body["status"] == "success", body
    result: list[dict] = body["data"]["result"]
    return result


@pytest.fixture(scope="module")
def scraped(tmp_path_factory) -> Iterator[tuple[LocalMesh, str]]:
    root = tmp_path_factory.mktemp("monitoring")
    plan = MeshPlan(data_dir=root / "mesh", base_port=0, lease_ttl=3,
                    servers=[ServerPlan("server-0", zone="local-a"), ServerPlan("server-1", zone="local-b")])
    with running_mesh(plan) as mesh:
        out = meshctl("--controlplane", mesh.controlplane, "model", "deploy", MODEL, "--backend", "sim",
                      "--replicas", "2", "--option", "tokens_per_second=1000")
        assert out.returncode == 0, out.stderr
        config = local_prometheus.write_config(mesh, root / "prometheus", scrape_interval="1s")
        address = f"127.0.0.1:{free_port()}"
        sup = Supervisor(root / "prometheus-logs")
        child = sup.start("prometheus", [prometheus_binary(), f"--config.file={config}",
                                         f"--storage.tsdb.path={root / 'tsdb'}", f"--web.listen-address={address}",
                                         "--log.level=warn"])
        try:
            sup.wait_ready(child, lambda: urllib.request.urlopen(f"http://{address}/-/ready", timeout=1).status == 200,
                           60, "ready")
            _traffic(mesh)
            yield mesh, address
        finally:
            sup.stop()


def _traffic(mesh: LocalMesh) -> None:
    """Streams and unary calls over gRPC and JSON through Envoy, and one refused request."""
    wait_for(lambda: _ready_replicas(mesh) == 2, 60, "both replicas READY")
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(mesh.envoy))
    for i in range(12):
        chunks = list(stub.GenerateStream(ask(f"monitor me please {i}", 8, model=MODEL), timeout=30))
        assert sum(len(c.token_ids) for c in chunks) == 8
    assert stub.Generate(ask("one more", 4, model=MODEL), timeout=30).usage.completion_tokens == 4
    with pytest.raises(grpc.RpcError) as missing:
        stub.Generate(ask("x", 1, model="no-such-model"), timeout=30)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with post_json(mesh.envoy, "/v1/generate", {"model": MODEL, "prompt": "json too"}) as resp:
        assert resp.status == 200


def _ready_replicas(mesh: LocalMesh) -> int:
    stub = inference_pb2_grpc.InferenceServiceStub(grpc.insecure_channel(mesh.envoy))
    models = stub.ListModels(inference_pb2.ListModelsRequest(), timeout=5).models
    return next((m.ready_replicas for m in models if m.name == MODEL), 0)


def _dashboard_exprs() -> dict[str, str]:
    """Every panel target's expression, with Grafana's variables resolved, by panel title."""
    dashboard = json.loads(DASHBOARD.read_text())
    out = {}
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            assert "$" not in expr, f"unresolved variable in {panel['title']}: {expr}"
            out[f"{panel['title']} [{target['refId']}]"] = expr
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), (\w+)\)", var["query"]["query"])
            assert match, var["query"]
            metric, label = match.groups()
            out[f"variable {var['name']}"] = f"count by ({label}) ({metric})"
    return out


def _rules() -> tuple[dict[str, str], dict[str, str]]:
    recording, alerts = {}, {}
    for path in sorted(local_prometheus.RULES_DIR.glob("*.yml")):
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "record" in rule:
                    recording[rule["record"]] = rule["expr"]
                else:
                    alerts[rule["alert"]] = rule["expr"]
    return recording, alerts


def _missing(address: str, exprs: dict[str, str]) -> list[str]:
    return [name for name, expr in exprs.items() if not query(address, expr)]


def test_every_target_is_scraped(scraped):
    mesh, address = scraped
    jobs = {"meshserve-controlplane": 1, "meshserve-modelserver": 2, "meshserve-router": 1, "meshserve-envoy": 1}
    wait_for(lambda: {j: len(query(address, f'up{{job="{j}"}} == 1')) for j in jobs} == jobs, 30,
             "every process scraped")
    servers = {r["metric"]["server"] for r in query(address, "meshserve_modelserver_requests_total")}
    assert servers == {"server-0", "server-1"}  # per-replica panels rely on the target label


def test_every_dashboard_expression_returns_data(scraped):
    _, address = scraped
    exprs = _dashboard_exprs()
    assert len(exprs) > 20
    wait_for(lambda: not _missing(address, exprs), 60, "every dashboard expression to return data")


def test_every_rule_returns_data(scraped):
    _, address = scraped
    recording, alerts = _rules()
    wait_for(lambda: not _missing(address, {name: name for name in recording}), 60,
             "every recording rule to have recorded a series")
    for name, expr in alerts.items():
        query(address, expr)  # evaluates (an alert that does not fire returns nothing)
        series = set(re.findall(r"\b(?:model(?:_server)?:[a-z0-9_:]+|meshserve_[a-z0-9_]+|up)\b", expr))
        assert series, name
        empty = [s for s in series if not query(address, s)]
        assert not empty, f"alert {name} reads series with no data: {empty}"
