"""Autoscale policies: the defaults, the checks, and the typed form the decision code reads.

An operator writes an `AutoscalePolicy` record (meshctl autoscale set); unset optional fields take
the defaults below, which follow Knative's KPA where it has one (60 s stable window, a panic window
of 10 % of it, panic at 2x, scale-down at most 2x per step, 70 % target utilisation). The same
checks run on records read back from etcd, so a record written around the API is reported and
ignored (the model keeps its replicas), never acted on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meshserve.v1 import autoscale_pb2 as asp

from services.common import names
from services.common.errors import InvalidArgument

MAX_REPLICAS = 1000
MAX_WINDOW_S = 3600.0
MAX_COOLDOWN_S = 86_400.0
#: A season of at most this many buckets (a week of hours is 168; a day of minutes 1440).
MAX_SEASON_BUCKETS = 2048
MIN_BUCKET_S = 1.0


@dataclass(frozen=True)
class Policy:
    """A policy with every default resolved (what `decide` reads)."""

    model: str
    enabled: bool = False
    min_replicas: int = 1
    max_replicas: int = 1
    scale_to_zero: bool = False
    target_utilization: float = 0.7
    target_concurrency: float = 0.0  # 0: max_running x target_utilization
    stable_window_s: float = 60.0
    panic_window_pct: float = 10.0
    panic_threshold: float = 2.0
    tolerance: float = 0.1
    max_scale_up_rate: float = 10.0
    max_scale_down_rate: float = 2.0
    scale_up_cooldown_s: float = 0.0
    scale_down_cooldown_s: float = 30.0
    zero_grace_s: float = 60.0
    ttft_slo_ms: float = 0.0
    kv_target: float = 0.9
    predictive: bool = False
    bucket_s: float = 60.0
    season_s: float = 86_400.0

    @property
    def panic_window_s(self) -> float:
        return self.stable_window_s * self.panic_window_pct / 100.0

    @property
    def season_buckets(self) -> int:
        return round(self.season_s / self.bucket_s)

    @property
    def floor(self) -> int:
        """The fewest replicas while the model has traffic."""
        return max(self.min_replicas, 1)


DEFAULTS = Policy(model="")

#: (field, low, high, low inclusive): the ranges of the optional numeric knobs.
_RANGES: dict[str, tuple[float, float, bool]] = {
    "target_utilization": (0.0, 1.0, False),
    "target_concurrency": (0.0, 1e6, True),
    "stable_window_s": (1.0, MAX_WINDOW_S, True),
    "panic_window_pct": (1.0, 100.0, True),
    "panic_threshold": (1.0, 100.0, True),
    "tolerance": (0.0, 0.9, True),
    "max_scale_up_rate": (1.0, 1000.0, False),
    "max_scale_down_rate": (1.0, 1000.0, False),
    "scale_up_cooldown_s": (0.0, MAX_COOLDOWN_S, True),
    "scale_down_cooldown_s": (0.0, MAX_COOLDOWN_S, True),
    "zero_grace_s": (0.0, MAX_COOLDOWN_S, True),
    "ttft_slo_ms": (0.0, 3_600_000.0, True),
    "kv_target": (0.0, 1.0, False),
    "bucket_s": (MIN_BUCKET_S, 86_400.0, True),
    "season_s": (2.0, 366 * 86_400.0, True),
}
OPTIONAL_FIELDS = tuple(_RANGES)


def _check_range(name: str, value: float) -> None:
    low, high, inclusive = _RANGES[name]
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    above = value >= low if inclusive else value > low
    if not above or value > high:
        bound = "[" if inclusive else "("
        raise InvalidArgument(f"{name} must be in {bound}{low:g}, {high:g}], got {value:g}")


def _check_bounds(record: asp.AutoscalePolicy) -> None:
    if not 1 <= record.max_replicas <= MAX_REPLICAS:
        raise InvalidArgument(f"max_replicas must be in [1, {MAX_REPLICAS}] (it is what stops "
                              f"runaway scaling, so it has no default), got {record.max_replicas}")
    if record.min_replicas < 0:
        raise InvalidArgument(f"min_replicas must be >= 0, got {record.min_replicas}")
    if record.min_replicas > record.max_replicas:
        raise InvalidArgument(f"min_replicas ({record.min_replicas}) is above max_replicas "
                              f"({record.max_replicas})")
    if record.scale_to_zero and record.min_replicas != 0:
        raise InvalidArgument(f"scale_to_zero needs min_replicas 0 (got {record.min_replicas}): "
                              "a minimum above zero would keep replicas anyway")


def _check_season(policy: Policy) -> None:
    buckets = policy.season_s / policy.bucket_s
    if abs(buckets - round(buckets)) > 1e-6:
        raise InvalidArgument(f"season_s ({policy.season_s:g}) must be a whole number of buckets "
                              f"of bucket_s ({policy.bucket_s:g})")
    if not 2 <= round(buckets) <= MAX_SEASON_BUCKETS:
        raise InvalidArgument(f"a season must hold 2 to {MAX_SEASON_BUCKETS} buckets, got "
                              f"{round(buckets)} (season_s / bucket_s)")


def validate(record: asp.AutoscalePolicy) -> Policy:
    """The typed policy, or InvalidArgument naming the field and what is allowed."""
    names.check_model_name(record.model)
    _check_bounds(record)
    for name in OPTIONAL_FIELDS:
        if record.HasField(name):
            _check_range(name, getattr(record, name))
    policy = resolve(record)
    _check_season(policy)
    if policy.panic_window_s < 1.0:
        raise InvalidArgument(f"the panic window ({policy.panic_window_s:g} s = stable_window_s x "
                              "panic_window_pct / 100) must be at least 1 s")
    return policy


def resolve(record: asp.AutoscalePolicy) -> Policy:
    """Defaults for every unset field (no checks: `validate` does them)."""
    values: dict[str, object] = {
        name: getattr(record, name) for name in OPTIONAL_FIELDS if record.HasField(name)}
    return Policy(model=record.model, enabled=record.enabled, min_replicas=record.min_replicas,
                  max_replicas=record.max_replicas, scale_to_zero=record.scale_to_zero,
                  predictive=record.predictive, **values)  # type: ignore[arg-type]


def as_record(policy: Policy, updated_ms: int = 0) -> asp.AutoscalePolicy:
    """Every field set: what GetAutoscale shows."""
    record = asp.AutoscalePolicy(model=policy.model, enabled=policy.enabled,
                                 min_replicas=policy.min_replicas,
                                 max_replicas=policy.max_replicas,
                                 scale_to_zero=policy.scale_to_zero, predictive=policy.predictive,
                                 updated_ms=updated_ms)
    for name in OPTIONAL_FIELDS:
        setattr(record, name, getattr(policy, name))
    return record


def stored_policy(key_name: str, record: asp.AutoscalePolicy) -> tuple[Policy | None, str]:
    """A record read from etcd: (the policy, '') or (None, why it is ignored)."""
    if record.model != key_name:
        return None, (f"the policy under autoscale/policies/{key_name[:64]} names model "
                      f"{record.model[:64]!r}; set it again with meshctl autoscale set")
    try:
        return validate(record), ""
    except InvalidArgument as exc:
        return None, f"the stored autoscale policy is invalid ({exc.message}); set it again"
