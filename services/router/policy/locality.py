"""Stage 2: keep traffic local unless local cannot take it.

Tiers, most preferred first: the request's region and the router's zone, the request's region,
everywhere. The first tier with a server below `spill_utilization` wins; a later tier is used
only when every server of the earlier ones is saturated or there are none ("spill"). When every
tier is saturated the most local non-empty tier keeps the request: spilling would not help, and
admission control (shedding, queueing) deals with it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from .types import Endpoint, RouteRequest, Settings

E = TypeVar("E", bound=Endpoint)


def tiers(endpoints: Sequence[E], req: RouteRequest, settings: Settings) -> list[list[E]]:
    """Non-empty, distinct tiers in order of preference (each a superset of the previous)."""
    out: list[list[E]] = []
    in_region = ([e for e in endpoints if e.region == req.region]
                 if settings.prefer_region and req.region else list(endpoints))
    if settings.prefer_zone and req.zone:
        out.append([e for e in in_region if e.zone == req.zone])
    out.append(in_region)
    out.append(list(endpoints))
    result: list[list[E]] = []
    for tier in out:
        if tier and (not result or len(tier) != len(result[-1])):
            result.append(tier)
    return result


def saturated(e: Endpoint, settings: Settings) -> bool:
    return e.load().utilization >= settings.spill_utilization


def select(endpoints: Sequence[E], req: RouteRequest, settings: Settings
           ) -> tuple[list[E], bool]:
    """(the tier to choose from, whether it spilled past the preferred tier)."""
    ordered = tiers(endpoints, req, settings)
    if not ordered:
        return [], False
    for i, tier in enumerate(ordered):
        open_ = [e for e in tier if not saturated(e, settings)]
        if open_:
            return tier, i > 0
    return ordered[0], False
