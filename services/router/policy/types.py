"""What the pipeline stages share: the request as routing sees it, an endpoint's load, and the
policy settings (from the RoutingPolicy record in etcd, with documented defaults)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from services.common.routing_defaults import (
    DEFAULT_AFFINITY_LOAD_BOUND,
    DEFAULT_SESSION_HEADER,
    DEFAULT_SPILL_UTILIZATION,
)

from .prefix import block_hashes


@dataclass(frozen=True)
class Load:
    """A replica's load as one router estimates it (see replica.Replica.load for the estimate)."""

    in_flight: int = 0  # running + queued at the server
    queue_depth: int = 0
    max_running: int = 0  # 0 = unknown (no load report yet)
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0

    @property
    def utilization(self) -> float:
        """(running + queued) / running capacity; 0 when the capacity is unknown."""
        return self.in_flight / self.max_running if self.max_running > 0 else 0.0

    @property
    def kv_fraction(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total > 0 else 0.0


class Endpoint(Protocol):
    """One replica - a model on a server - as the policy sees it (pool.Replica implements it).

    Candidates for one request are replicas of one model, so `server_id` is unique among them;
    `replica_id` ("server/model") keys what is per replica across models (the prefix record).
    """

    @property
    def server_id(self) -> str: ...

    @property
    def replica_id(self) -> str: ...

    @property
    def region(self) -> str: ...

    @property
    def zone(self) -> str: ...

    def load(self) -> Load: ...

    def ejected(self, now: float) -> bool: ...


@dataclass(frozen=True)
class Settings:
    """Routing knobs. Built from the RoutingPolicy proto; zero values mean the default."""

    session_header: str = DEFAULT_SESSION_HEADER
    affinity_load_bound: float = DEFAULT_AFFINITY_LOAD_BOUND
    prefer_region: bool = True
    prefer_zone: bool = True
    spill_utilization: float = DEFAULT_SPILL_UTILIZATION

    @classmethod
    def from_proto(cls, policy: object | None) -> Settings:
        """No record in etcd means every default, locality preferences on. A record is taken as
        written for the two booleans (proto3 cannot tell unset from false)."""
        if policy is None:
            return cls()
        return cls(
            session_header=getattr(policy, "session_header", "") or DEFAULT_SESSION_HEADER,
            affinity_load_bound=getattr(policy, "affinity_load_bound", 0.0)
            or DEFAULT_AFFINITY_LOAD_BOUND,
            prefer_region=bool(getattr(policy, "prefer_region", True)),
            prefer_zone=bool(getattr(policy, "prefer_zone", True)),
            spill_utilization=getattr(policy, "spill_utilization", 0.0)
            or DEFAULT_SPILL_UTILIZATION)


@dataclass
class RouteRequest:
    """One request, reduced to what routing needs."""

    model: str
    region: str = ""  # the request's region, or the router's own when the request names none
    zone: str = ""  # the router's zone ("" = no zone preference)
    session: str = ""
    text: str = ""  # the rendered prompt (prefix.render), hashed lazily
    _hashes: list[int] | None = field(default=None, repr=False)
    # For scoring on KV events (policy/precise.py): what the engine tokenizes and keys with.
    prompt: str = ""
    messages: Sequence[Any] = ()
    tenant: str = ""
    share_system_prompt: bool = False
    token_memo: dict[str, Any] = field(default_factory=dict, repr=False)
    kv_keys: dict[bytes, list[bytes]] = field(default_factory=dict, repr=False)

    def block_hashes(self, block_chars: int) -> list[int]:
        if self._hashes is None:
            self._hashes = block_hashes(self.text, block_chars)
        return self._hashes
