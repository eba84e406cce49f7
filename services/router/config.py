"""Knobs of the request path (router flags); defaults suit both tests and production."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DispatchSettings:
    policy: str = "meshserve"  # meshserve, least_load, round_robin or meshserve_text
    #: model name -> policy name, for models that should route differently from the default.
    model_policies: tuple[tuple[str, str], ...] = ()
    region: str = "local"  # the router's own region: requests without one prefer it
    zone: str = ""  # the router's zone ("" = no zone preference)
    #: Attempts before the first token (the first one included).
    max_attempts: int = 3
    #: Times one stream may move to another server after tokens were relayed.
    max_migrations: int = 3
    #: An attempt that produced no token for this long is abandoned (a wedged server).
    first_token_timeout_s: float = 60.0
    #: An attempt whose stream went silent this long between tokens is abandoned and migrated.
    stall_timeout_s: float = 30.0
    #: A server whose load stream (a report at least every second) is silent this long is hung:
    #: its attempts move elsewhere at once and it is skipped until it reports again.
    hang_timeout_s: float = 3.0
    #: A client that reads nothing for this long has its request cancelled (the upstream
    #: generation with it); bounded HTTP/2 windows pause it long before that.
    slow_consumer_s: float = 60.0
    #: Backoff before retry k (k >= 1): base * 2^(k-1), capped, with jitter.
    backoff_base_s: float = 0.02
    backoff_max_s: float = 0.25
    retry_budget_ratio: float = 0.2
    retry_budget_floor: int = 10
    retry_budget_window_s: float = 10.0
    #: A server at or above this utilization ((running + queued) / max_running) has no room:
    #: when every candidate is there, SHEDDABLE is refused and STANDARD waits.
    shed_utilization: float = 1.0
    queue_size: int = 256
    #: How long STANDARD waits when the client set no deadline.
    queue_timeout_s: float = 30.0
    #: How long a request without a deadline waits for the first replica of a model scaled to
    #: zero (the control plane places one; loading may take a while).
    activation_timeout_s: float = 120.0
    retry_after_ms: int = 1000

    def validate(self) -> None:
        from .policy import POLICIES

        for name in (self.policy, *(p for _, p in self.model_policies)):
            if name not in POLICIES:
                raise ValueError(f"unknown routing policy {name!r}; choose one of "
                                 f"{', '.join(POLICIES)}")
        if self.max_attempts < 1 or self.max_migrations < 0:
            raise ValueError("max_attempts must be >= 1 and max_migrations >= 0")
        for name in ("first_token_timeout_s", "stall_timeout_s", "queue_timeout_s", "shed_utilization",
                     "hang_timeout_s", "slow_consumer_s", "activation_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")
        if self.queue_size < 0 or self.retry_after_ms < 0:
            raise ValueError("queue_size and retry_after_ms must be >= 0")
