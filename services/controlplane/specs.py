"""Checks on what an operator asks for. Plain functions: a refused request changes nothing."""

from __future__ import annotations

import os

from meshserve.v1 import controlplane_pb2 as cp

from services.common import keyspace
from services.common.validation import BACKENDS

MAX_REPLICAS = 1000


def validate_regions(regions, replicas: int, known_regions: set[str]) -> None:
    seen = set()
    for r in regions:
        if not r.region:
            raise ValueError("a region requirement needs a region name")
        if r.region in seen:
            raise ValueError(f"region {r.region!r} is listed twice")
        seen.add(r.region)
        if r.region not in known_regions:
            known = ", ".join(sorted(known_regions)) or "none yet"
            raise ValueError(f"unknown region {r.region!r}: no server has registered there "
                             f"(regions with servers: {known})")
        if r.min_replicas < 0:
            raise ValueError(f"region {r.region}: min_replicas must be >= 0, got {r.min_replicas}")
    total_min = sum(r.min_replicas for r in regions)
    if total_min > replicas:
        raise ValueError(f"regional minimums add up to {total_min}, more than replicas={replicas}")


def validate_replicas(replicas: int) -> None:
    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    if replicas > MAX_REPLICAS:
        raise ValueError(f"replicas must be <= {MAX_REPLICAS}, got {replicas}")


def validate_source(backend: str, source: str) -> None:
    if backend == "sim":
        if source not in ("", "embedded", "sim"):
            raise ValueError("the sim backend has no weights: leave source empty")
        return
    if source in ("", "embedded"):
        return
    if not os.path.exists(source):
        raise ValueError(f"source {source!r} does not exist (give 'embedded', a .gguf file or a "
                         "Hugging Face-style folder readable by the model servers)")


def validate_spec(spec: cp.ModelSpec, known_regions: set[str]) -> None:
    try:
        keyspace.model_key(spec.name)
    except ValueError as exc:
        raise ValueError(str(exc)) from None
    if spec.backend not in BACKENDS:
        raise ValueError(f"unknown backend {spec.backend!r}; choose one of {', '.join(BACKENDS)}")
    validate_replicas(spec.replicas)
    if spec.replicas == 0:
        raise ValueError("deploy at least 1 replica (scale to 0 later if needed)")
    validate_regions(spec.regions, spec.replicas, known_regions)
    if spec.memory_bytes < 0:
        raise ValueError(f"memory_bytes must be >= 0, got {spec.memory_bytes}")
    validate_source(spec.backend, spec.source)


def validate_policy(policy: cp.RoutingPolicy) -> None:
    if policy.affinity_load_bound and policy.affinity_load_bound < 1.0:
        raise ValueError("affinity_load_bound must be >= 1.0 (0 = default 1.25): below 1 no server "
                         "could ever take its sessions")
    if not 0.0 <= policy.spill_utilization <= 1.0:
        raise ValueError(f"spill_utilization must be in [0, 1], got {policy.spill_utilization}")
    if policy.session_header and (policy.session_header != policy.session_header.lower()
                                  or " " in policy.session_header):
        raise ValueError("session_header must be a lower-case header name without spaces")
