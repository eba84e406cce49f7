"""The Prometheus rules and scrape configuration under deploy/prometheus, checked with promtool:
rule syntax, the SLO alerts' unit tests (they fire on a burning budget, stay quiet on client
errors, clear after recovery), and the Kubernetes scrape config labelling targets exactly as
the local mesh's does (the dashboard relies on those labels)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from services.localmesh import prometheus as local_prometheus
from tests.helpers import REPO

PROM = REPO / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    found = shutil.which("promtool", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    assert found, "no promtool: `make setup` unpacks Debian's prometheus package into .venv/bin"
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=60, cwd=REPO)


def test_rules_are_valid():
    done = promtool("check", "rules", *map(str, sorted((PROM / "rules").glob("*.yml"))))
    assert done.returncode == 0, done.stdout + done.stderr


def test_slo_alerts_fire_and_clear_as_specified():
    done = promtool("test", "rules", *map(str, sorted((PROM / "tests").glob("*.yml"))))
    assert done.returncode == 0, done.stdout + done.stderr


def test_kubernetes_scrape_config_labels_targets_like_the_local_mesh():
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    for rule_file in config["rule_files"]:
        assert (PROM / rule_file).is_file(), rule_file
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "meshserve")
    labels = {}
    for relabel in job["relabel_configs"]:
        if relabel.get("target_label") in local_prometheus.JOBS.values():
            component = relabel["regex"].split(";")[0]
            labels[f"meshserve-{component}"] = relabel["target_label"]
    assert labels == local_prometheus.JOBS


def test_local_config_is_accepted_by_promtool(tmp_path):
    class Mesh:  # what write_config reads from a LocalMesh
        metrics = {"controlplane0": "127.0.0.1:1", "server-0": "127.0.0.1:2", "router0": "127.0.0.1:3"}
        servers = {"server-0": "127.0.0.1:4"}
        envoy_admin = "127.0.0.1:5"

    path = local_prometheus.write_config(Mesh(), tmp_path)  # type: ignore[arg-type]
    done = promtool("check", "config", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    groups = json.loads((tmp_path / "targets.json").read_text())
    assert {g["labels"]["job"]: g["labels"] for g in groups}["meshserve-modelserver"]["server"] == "server-0"


def test_dashboard_panels_use_the_datasource_variable_and_unique_ids():
    dashboard = json.loads((REPO / "deploy" / "grafana" / "meshserve.json").read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            assert target["expr"].strip(), panel["title"]
