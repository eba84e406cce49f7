"""Where each model's replicas go. A pure function of the mesh state: every replica computes the
same plan from the same etcd revision, and tests need neither etcd nor gRPC.

Rules, in order:
1. Keep what is placed where it still may be (stable: no churn when nothing changed).
2. Servers that are gone, unhealthy, released after a drain, or failed this model lose it.
3. Draining servers keep their placements until released, but do not count toward replicas, so
   replacements are placed at once.
4. Each region's minimum first, then the total; a new replica goes to the zone with the fewest
   replicas of the model (two share a zone only when no other zone has room), then the region with
   the fewest, then the server with the most free memory, then the lowest id.
5. Memory budgets are never exceeded (a budget of 0 means unlimited).
6. A halted model (it failed to load on too many servers) keeps what it has but gets no new
   replicas.
7. Scaling budgets (budgets.py: caps on replicas and memory per region, zone or the whole mesh)
   are never crossed by a new replica; replicas already placed stay.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field

from .budgets import Budget, BudgetUse


@dataclass(frozen=True)
class Server:
    server_id: str
    region: str
    zone: str
    memory_bytes: int = 0  # budget for placed models; 0 = unlimited
    usable: bool = True  # alive, not NOT_SERVING, not released after a drain
    draining: bool = False  # keeps placements (until released) but they do not count


@dataclass(frozen=True)
class ModelRequest:
    name: str
    replicas: int
    memory_bytes: int = 0
    region_minimums: tuple[tuple[str, int], ...] = ()  # allowed regions with minimums; () = any
    halted: bool = False  # keep, trim, but place nothing new

    @property
    def allowed_regions(self) -> set[str] | None:
        return {r for r, _ in self.region_minimums} or None


@dataclass
class Plan:
    placements: dict[str, set[str]] = field(default_factory=dict)  # model -> servers
    unsatisfied: dict[str, str] = field(default_factory=dict)  # model -> why
    #: model -> replicas missing for want of a usable server with room (budgets, halts and
    #: failed loads excluded): what more servers would fix.
    short: dict[str, int] = field(default_factory=dict)

    def pairs(self) -> set[tuple[str, str]]:
        return {(s, m) for m, servers in self.placements.items() for s in servers}


def plan(models: list[ModelRequest], servers: list[Server], current: dict[str, set[str]],
         failed: AbstractSet[tuple[str, str]] = frozenset(), budgets: Sequence[Budget] = ()) -> Plan:
    by_id = {s.server_id: s for s in servers}
    use = BudgetUse(budgets, by_id)
    memory = {m.name: m.memory_bytes for m in models}
    result = Plan()

    # 1-3: what stays.
    for m in sorted(models, key=lambda m: m.name):
        allowed = m.allowed_regions
        result.placements[m.name] = {
            sid for sid in current.get(m.name, set())
            if sid in by_id and by_id[sid].usable and (sid, m.name) not in failed
            and (allowed is None or by_id[sid].region in allowed)}
    used: Counter[str] = Counter()
    for name, sids in result.placements.items():
        for sid in sids:
            used[sid] += memory[name]
            use.add(sid, memory[name])

    for m in sorted(models, key=lambda m: m.name):
        placed = result.placements[m.name]
        _trim(m, placed, by_id, used, use)
        if m.halted:
            continue
        reason, short = _fill(m, placed, by_id, used, failed, use)
        if reason:
            result.unsatisfied[m.name] = reason
        if short:
            result.short[m.name] = short
    return result


def _counting(placed: set[str], by_id: dict[str, Server]) -> list[Server]:
    return [by_id[s] for s in placed if not by_id[s].draining]


def _trim(m: ModelRequest, placed: set[str], by_id: dict[str, Server], used: Counter,
          use: BudgetUse) -> None:
    """Scale down: drop replicas from the most crowded zone, never below a region's minimum."""
    minimums = dict(m.region_minimums)
    while len(_counting(placed, by_id)) > m.replicas:
        counting = _counting(placed, by_id)
        zones = Counter((s.region, s.zone) for s in counting)
        regions = Counter(s.region for s in counting)
        removable = [s for s in counting if regions[s.region] > minimums.get(s.region, 0)]
        if not removable:
            return
        victim = max(removable, key=lambda s: (zones[(s.region, s.zone)], regions[s.region],
                                               s.server_id))
        placed.discard(victim.server_id)
        used[victim.server_id] -= m.memory_bytes
        use.remove(victim.server_id, m.memory_bytes)


def _fill(m: ModelRequest, placed: set[str], by_id: dict[str, Server], used: Counter,
          failed: AbstractSet[tuple[str, str]], use: BudgetUse) -> tuple[str, int]:
    """('', 0) when the model has its replicas, else why not and how many replicas more
    servers would place."""
    allowed = m.allowed_regions
    minimums = dict(m.region_minimums)
    while True:
        counting = _counting(placed, by_id)
        regions = Counter(s.region for s in counting)
        short = sorted(r for r, need in minimums.items() if regions[r] < need)
        if not short and len(counting) >= m.replicas:
            return "", 0
        roomy = [s for s in by_id.values()
                 if s.usable and not s.draining and s.server_id not in placed
                 and (s.server_id, m.name) not in failed
                 and (allowed is None or s.region in allowed)
                 and _fits(s, used, m.memory_bytes)]
        if short:
            roomy = [s for s in roomy if s.region in short]
        pool = [s for s in roomy if use.blocking(s, m.memory_bytes) is None]
        if not pool:
            missing = max(m.replicas - len(counting),
                          sum(need - regions[r] for r, need in minimums.items() if regions[r] < need))
            head = f"{len(counting)} of {m.replicas} replicas placed"
            if roomy:
                budget = use.blocking(roomy[0], m.memory_bytes)
                return f"{head}: {budget.describe() if budget else 'a budget'} is reached", 0
            where = f"in region {short[0]}" if short else "anywhere allowed"
            need = f" with {m.memory_bytes} bytes free" if m.memory_bytes else ""
            return f"{head}: no more usable servers {where}{need}", missing
        zones = Counter((s.region, s.zone) for s in counting)
        best = min(pool, key=lambda s: (zones[(s.region, s.zone)], regions[s.region],
                                        -_free(s, used), s.server_id))
        placed.add(best.server_id)
        used[best.server_id] += m.memory_bytes
        use.add(best.server_id, m.memory_bytes)


def _free(s: Server, used: Counter) -> int:
    return (s.memory_bytes - used[s.server_id]) if s.memory_bytes else 1 << 62


def _fits(s: Server, used: Counter, need: int) -> bool:
    return not s.memory_bytes or used[s.server_id] + need <= s.memory_bytes
