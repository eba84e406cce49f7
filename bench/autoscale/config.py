"""The benchmark's settings: the sim engine's timing, the traces, the policies (full and smoke)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    name: str = "autoscale"
    # Sim engine, per replica: 8 tokens/s per sequence and 4 sequences at once (a large model
    # on one GPU at a modest batch), 0.1 s to the first token, 8 s to load its weights.
    tokens_per_second: float = 8.0
    first_token_latency_s: float = 0.1
    max_running: int = 4
    load_seconds: float = 8.0
    max_tokens: int = 16
    prompt_words: int = 24
    servers_per_group: int = 6
    # Ramp (defaults of the policy, as an operator gets them): 0.3 -> peak req/s, hold, stop.
    ramp_low_rps: float = 0.3
    ramp_peak_rps: float = 6.0
    ramp_up_s: float = 60.0
    ramp_hold_s: float = 40.0
    ramp_max_replicas: int = 6
    ramp_budget: int = 4  # region budget: binds below what the peak asks for
    down_timeout_s: float = 360.0
    # Scale to zero: a burst of requests (within the router queue's capacity of 256).
    zero_grace_s: float = 10.0
    zero_burst: int = 24
    # Diurnal: one compressed day of `season_s` in buckets of `bucket_s` from the morning ramp,
    # after a warm-up of night; two earlier days of history seeded from the same trace (with
    # Poisson noise). The set-up before the warm-up falls into that night too.
    season_s: float = 240.0
    bucket_s: float = 10.0
    warmup_s: float = 45.0
    night_rps: float = 0.5
    day_rps: float = 4.5
    spike_rps: float = 2.0
    target_utilization: float = 0.8
    diurnal_max_replicas: int = 6
    slo_ttft_s: float = 1.0
    seed: int = 13


FULL = Settings()
SMOKE = Settings(name="autoscale-smoke", ramp_up_s=20.0, ramp_hold_s=15.0, ramp_peak_rps=3.0,
                 season_s=80.0, warmup_s=15.0, day_rps=3.0, zero_burst=8, servers_per_group=3,
                 ramp_max_replicas=3, ramp_budget=2, diurnal_max_replicas=3, load_seconds=3.0)
