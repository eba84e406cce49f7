"""The routing pipeline: plain Python stages that choose a model server for one request.

candidates -> locality -> (session affinity | prefix-and-load scoring). Each stage is its own
module with one job and no gRPC, so every decision is unit-testable with fake endpoints.
`pipeline.make_policy` builds the policy a router runs (`--policy`).
"""

from .pipeline import POLICIES, Pick, Policy, make_policy
from .types import Endpoint, Load, RouteRequest, Settings

__all__ = ["POLICIES", "Endpoint", "Load", "Pick", "Policy", "RouteRequest", "Settings",
           "make_policy"]
