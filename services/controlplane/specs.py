"""Checks on desired state: what an operator asks for, and what the leader finds in etcd.

Plain functions raising `InvalidArgument` with the field and what is allowed; a refused request
changes nothing. The same checks run on records read back from etcd (`stored_spec_problem`), so
a record written around the API (by hand, by an older version) is reported, not placed.
The control plane checks a model source's syntax only: it never looks at its own filesystem.
"""

from __future__ import annotations

import math
import re

from meshserve.v1 import controlplane_pb2 as cp

from services.common import names
from services.common.errors import InvalidArgument
from services.modelserver.engine import options as engine_options
from services.modelserver.engine import sources

MAX_REPLICAS = 1000
MAX_REGIONS = 64
MAX_AFFINITY_LOAD_BOUND = 100.0
MAX_HEADER_CHARS = 128
#: An HTTP header name (RFC 9110 token), lower case as HTTP/2 and gRPC metadata require.
HEADER_TOKEN = re.compile(r"[a-z0-9!#$%&'*+.^_`|~-]+")


def validate_regions(regions, replicas: int, known_regions: set[str] | None) -> None:
    """known_regions None: the leader re-checking a stored record (regions may come and go)."""
    if len(regions) > MAX_REGIONS:
        raise InvalidArgument(f"at most {MAX_REGIONS} region requirements, got {len(regions)}")
    seen = set()
    for r in regions:
        if not r.region:
            raise InvalidArgument("a region requirement needs a region name")
        names.check_name("region", r.region)
        if r.region in seen:
            raise InvalidArgument(f"region {r.region!r} is listed twice")
        seen.add(r.region)
        if known_regions is not None and r.region not in known_regions:
            known = ", ".join(sorted(known_regions)) or "none yet"
            raise InvalidArgument(f"unknown region {r.region!r}: no server has registered there "
                                  f"(regions with servers: {known})")
        if r.min_replicas < 0:
            raise InvalidArgument(f"region {r.region}: min_replicas must be >= 0, got "
                                  f"{r.min_replicas}")
    total_min = sum(r.min_replicas for r in regions)
    if total_min > replicas:
        raise InvalidArgument(f"regional minimums add up to {total_min}, more than "
                              f"replicas={replicas}")


def validate_replicas(replicas: int) -> None:
    if replicas < 0:
        raise InvalidArgument(f"replicas must be >= 0, got {replicas}")
    if replicas > MAX_REPLICAS:
        raise InvalidArgument(f"replicas must be <= {MAX_REPLICAS}, got {replicas}")


def _check_loadable(spec: cp.ModelSpec) -> None:
    """Backend, source syntax and engine options; normalises source and option text in place."""
    engine_options.check_backend(spec.backend)
    if spec.memory_bytes < 0:
        raise InvalidArgument(f"memory_bytes must be >= 0, got {spec.memory_bytes}")
    spec.source = sources.check_source(spec.backend, spec.source)
    typed = engine_options.validate_options(spec.backend, dict(spec.options))
    spec.options.clear()
    spec.options.update(engine_options.as_text(typed))


def validate_spec(spec: cp.ModelSpec, known_regions: set[str]) -> None:
    """A new deployment; normalises source and options in place."""
    names.check_model_name(spec.name)
    validate_replicas(spec.replicas)
    if spec.replicas == 0:
        raise InvalidArgument("deploy at least 1 replica (scale to 0 later if needed)")
    validate_regions(spec.regions, spec.replicas, known_regions)
    _check_loadable(spec)


def stored_spec_problem(key_name: str, spec: cp.ModelSpec) -> str:
    """'' when a ModelSpec read from etcd may be placed, else why not."""
    if spec.name != key_name:
        return (f"the record under models/{key_name[:64]} names model {spec.name[:64]!r}; "
                "undeploy and deploy it again")
    copy = cp.ModelSpec()
    copy.CopyFrom(spec)
    try:
        names.check_model_name(spec.name)
        validate_replicas(spec.replicas)
        validate_regions(spec.regions, spec.replicas, None)
        _check_loadable(copy)
    except InvalidArgument as exc:
        return f"the deployment record is invalid ({exc.message}); undeploy and deploy it again"
    return ""


def _finite(name: str, value: float) -> None:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")


def validate_policy(policy: cp.RoutingPolicy) -> None:
    _finite("affinity_load_bound", policy.affinity_load_bound)
    _finite("spill_utilization", policy.spill_utilization)
    if policy.affinity_load_bound and not 1.0 <= policy.affinity_load_bound <= MAX_AFFINITY_LOAD_BOUND:
        raise InvalidArgument(f"affinity_load_bound must be in [1, {MAX_AFFINITY_LOAD_BOUND:g}] "
                              "(0 = default 1.25): below 1 no server could ever take its sessions, "
                              f"got {policy.affinity_load_bound}")
    if not 0.0 <= policy.spill_utilization <= 1.0:
        raise InvalidArgument(f"spill_utilization must be in [0, 1], got {policy.spill_utilization}")
    header = policy.session_header
    if header and (len(header) > MAX_HEADER_CHARS or not HEADER_TOKEN.fullmatch(header)):
        raise InvalidArgument(f"session_header {header[:80]!r} must be a lower-case HTTP header "
                              f"name of at most {MAX_HEADER_CHARS} characters (letters, digits and "
                              "!#$%&'*+.^_`|~-; no spaces, newlines or ':')")
    if header.startswith("grpc-") or header in ("te", "content-type", "host"):
        raise InvalidArgument(f"session_header {header!r} is reserved by HTTP/2 or gRPC")
