"""Scaling budgets: per region / zone (or mesh-wide) caps on placed replicas and their memory.

Placement never places a replica that would take a scope over its cap (existing replicas stay),
and the autoscaler never asks for more replicas than the budgets leave a model, naming the budget
that binds. Plain Python over the planner's `Server` type: every replica computes the same.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from meshserve.v1 import autoscale_pb2 as asp

from services.common import names
from services.common.errors import InvalidArgument

if TYPE_CHECKING:  # placement imports this module; only the type is needed here
    from .placement import Server

MAX_BUDGETS = 256


@dataclass(frozen=True)
class Budget:
    region: str = ""
    zone: str = ""
    max_replicas: int = 0  # 0 = no cap
    max_memory_bytes: int = 0  # 0 = no cap

    def covers(self, server: Server) -> bool:
        return (not self.region or server.region == self.region) and \
            (not self.zone or server.zone == self.zone)

    @property
    def scope(self) -> str:
        if not self.region:
            return "mesh-wide"
        return f"region {self.region}" + (f" zone {self.zone}" if self.zone else "")

    def describe(self) -> str:
        caps = []
        if self.max_replicas:
            caps.append(f"{self.max_replicas} replicas")
        if self.max_memory_bytes:
            caps.append(f"{self.max_memory_bytes / 2**30:.3g} GiB")
        return f"budget {self.scope}: {', '.join(caps)}"


def from_record(record: asp.ScalingBudgets | None) -> tuple[Budget, ...]:
    """Budgets from the stored record; entries that break the rules are skipped."""
    if record is None:
        return ()
    out: dict[tuple[str, str], Budget] = {}
    for b in record.budgets[:MAX_BUDGETS]:
        try:
            check_budget(b)
        except InvalidArgument:
            continue
        out.setdefault((b.region, b.zone), Budget(b.region, b.zone, b.max_replicas,
                                                  b.max_memory_bytes))
    return tuple(out.values())


def check_budget(b: asp.ScalingBudget) -> None:
    if b.region:
        names.check_name("region", b.region)
    if b.zone:
        if not b.region:
            raise InvalidArgument(f"budget for zone {b.zone!r} needs its region")
        names.check_name("zone", b.zone)
    if b.max_replicas < 0 or b.max_memory_bytes < 0:
        raise InvalidArgument(f"budget for {b.region or 'the mesh'}: caps must be >= 0 "
                              f"(0 = no cap), got replicas={b.max_replicas}, "
                              f"memory={b.max_memory_bytes}")
    if not b.max_replicas and not b.max_memory_bytes:
        raise InvalidArgument(f"budget for {b.region or 'the mesh'} caps nothing: give "
                              "max_replicas or max_memory_bytes")


def validate_record(record: asp.ScalingBudgets) -> None:
    if len(record.budgets) > MAX_BUDGETS:
        raise InvalidArgument(f"at most {MAX_BUDGETS} budgets, got {len(record.budgets)}")
    seen = set()
    for b in record.budgets:
        check_budget(b)
        if (b.region, b.zone) in seen:
            raise InvalidArgument(f"two budgets for {Budget(b.region, b.zone).scope}")
        seen.add((b.region, b.zone))


class BudgetUse:
    """Replicas and memory placed per budget scope, as the planner adds and removes them."""

    def __init__(self, budgets: Iterable[Budget], servers: Mapping[str, Server]) -> None:
        self.budgets = tuple(budgets)
        self._servers = servers
        self.replicas: Counter[Budget] = Counter()
        self.memory: Counter[Budget] = Counter()

    def add(self, server_id: str, memory: int, sign: int = 1) -> None:
        server = self._servers.get(server_id)
        if server is None:
            return
        for b in self.budgets:
            if b.covers(server):
                self.replicas[b] += sign
                self.memory[b] += sign * memory

    def remove(self, server_id: str, memory: int) -> None:
        self.add(server_id, memory, -1)

    def blocking(self, server: Server, memory: int) -> Budget | None:
        """The budget one more replica on `server` would cross, if any."""
        for b in self.budgets:
            if not b.covers(server):
                continue
            if b.max_replicas and self.replicas[b] + 1 > b.max_replicas:
                return b
            if b.max_memory_bytes and self.memory[b] + memory > b.max_memory_bytes:
                return b
        return None

    def headroom(self, b: Budget, memory: int) -> float:
        """Replicas of `memory` bytes each that still fit under `b`."""
        room = math.inf
        if b.max_replicas:
            room = max(0, b.max_replicas - self.replicas[b])
        if b.max_memory_bytes and memory > 0:
            room = min(room, max(0, (b.max_memory_bytes - self.memory[b]) // memory))
        return room


def model_cap(use: BudgetUse, servers: Iterable[Server], allowed_regions: set[str] | None,
              memory: int) -> tuple[float, Budget | None]:
    """How many replicas of one model the budgets allow, given everything else placed in `use`
    (the model's own replicas left out): regions add up, within a region its zone budgets add up
    when every zone there has one, and a mesh-wide budget caps the sum. (inf, None) = unbounded."""
    zones: dict[str, set[str]] = {}
    for s in servers:
        if allowed_regions is None or s.region in allowed_regions:
            zones.setdefault(s.region, set()).add(s.zone)
    by_scope = {(b.region, b.zone): b for b in use.budgets}
    total = 0.0
    tightest: tuple[float, Budget | None] = (math.inf, None)
    for region, region_zones in zones.items():
        zone_room, zone_binding = 0.0, None
        for zone in region_zones:
            b = by_scope.get((region, zone))
            if b is None:
                zone_room, zone_binding = math.inf, None
                break
            zone_room += use.headroom(b, memory)
            zone_binding = b
        cap, binding = zone_room, zone_binding
        rb = by_scope.get((region, ""))
        if rb is not None and use.headroom(rb, memory) < cap:
            cap, binding = use.headroom(rb, memory), rb
        total += cap
        if binding is not None and cap < tightest[0]:
            tightest = (cap, binding)
    mesh = by_scope.get(("", ""))
    if mesh is not None and use.headroom(mesh, memory) < total:
        return use.headroom(mesh, memory), mesh
    return total, (tightest[1] if math.isfinite(total) else None)
