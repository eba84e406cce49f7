"""The routing policy that applies when no RoutingPolicy record exists in etcd.

One definition for the router (which applies it) and the control plane (which shows it and
starts edits from it, so `meshctl policy set --x` never switches other settings off).
"""

from __future__ import annotations

from meshserve.v1 import controlplane_pb2 as cp

DEFAULT_SESSION_HEADER = "x-session-id"
DEFAULT_AFFINITY_LOAD_BOUND = 1.25
DEFAULT_SPILL_UTILIZATION = 0.9


def default_policy() -> cp.RoutingPolicy:
    return cp.RoutingPolicy(session_header=DEFAULT_SESSION_HEADER,
                            affinity_load_bound=DEFAULT_AFFINITY_LOAD_BOUND,
                            prefer_region=True, prefer_zone=True,
                            spill_utilization=DEFAULT_SPILL_UTILIZATION)
