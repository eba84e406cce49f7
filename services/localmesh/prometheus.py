"""A Prometheus configuration for the local mesh: the same jobs, target labels and rule files as
the Kubernetes one (deploy/prometheus/), with the mesh's loopback addresses as static targets.

`meshserve up` writes it next to the logs so a person can point a Prometheus at the running mesh;
the monitoring test runs a real Prometheus on it, so the dashboard and the rules are checked
against the labels that production scrapes produce.
"""

from __future__ import annotations

import json
from pathlib import Path

from .mesh import LocalMesh

RULES_DIR = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"

#: job -> the target label that names the process (its --id), as deploy/prometheus relabels it.
JOBS = {
    "meshserve-controlplane": "controlplane",
    "meshserve-modelserver": "server",
    "meshserve-router": "router",
    "meshserve-openai-gateway": "gateway",
}


def scrape_targets(mesh: LocalMesh) -> list[dict]:
    """file_sd target groups: one per process, labelled with its job and id."""
    groups = []
    for name, address in mesh.metrics.items():
        if name in mesh.servers:
            job = "meshserve-modelserver"
        elif name.startswith("router"):
            job = "meshserve-router"
        elif name.startswith("gateway"):
            job = "meshserve-openai-gateway"
        else:
            job = "meshserve-controlplane"
        groups.append({"targets": [address], "labels": {"job": job, JOBS[job]: name}})
    return groups


def config(mesh: LocalMesh, targets_file: Path, scrape_interval: str = "5s") -> dict:
    """The prometheus.yml: MeshServe jobs from `targets_file`, Envoy from its admin port."""
    return {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": scrape_interval},
        "rule_files": [str(p) for p in sorted(RULES_DIR.glob("*.yml"))],
        "scrape_configs": [
            {"job_name": "meshserve", "file_sd_configs": [{"files": [str(targets_file)]}]},
            {"job_name": "meshserve-envoy", "metrics_path": "/stats/prometheus",
             "static_configs": [{"targets": [mesh.envoy_admin], "labels": {"edge": "envoy"}}]},
        ],
    }


def write_config(mesh: LocalMesh, directory: Path, scrape_interval: str = "5s") -> Path:
    """Write prometheus.yml and its targets file under `directory`; returns the config's path.
    JSON is YAML, so no YAML library is needed."""
    directory.mkdir(parents=True, exist_ok=True)
    targets = directory / "targets.json"
    targets.write_text(json.dumps(scrape_targets(mesh), indent=1))
    path = directory / "prometheus.yml"
    path.write_text(json.dumps(config(mesh, targets, scrape_interval), indent=1))
    return path
