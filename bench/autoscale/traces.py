"""Request-rate traces (a ramp, a compressed day) and open-loop arrival times from them."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

from .config import Settings

Trace = Callable[[float], float]  # seconds since the trace started -> requests per second


def ramp(s: Settings) -> Trace:
    def rate(t: float) -> float:
        if t < s.ramp_up_s:
            return s.ramp_low_rps + (s.ramp_peak_rps - s.ramp_low_rps) * t / s.ramp_up_s
        return s.ramp_peak_rps if t < s.ramp_up_s + s.ramp_hold_s else 0.0
    return rate


def day(s: Settings) -> Callable[[float], float]:
    """Rate at time of day tau: night, a steep morning ramp, the day with a short midday spike,
    an evening decline, night (fractions of the season)."""
    def rate(tau: float) -> float:
        x = (tau % s.season_s) / s.season_s
        if x < 0.2 or x >= 0.84:
            level = 0.0
        elif x < 0.32:  # morning ramp
            level = (x - 0.2) / 0.12
        elif x < 0.72:
            level = 1.0
        else:  # evening
            level = 1.0 - (x - 0.72) / 0.12
        spike = s.spike_rps if 0.5 <= x < 0.58 else 0.0
        return s.night_rps + (s.day_rps - s.night_rps) * level + spike
    return rate


def arrivals(rate: Trace, duration_s: float, seed: int) -> list[float]:
    """Times of a non-homogeneous Poisson process (thinning), reproducible from the seed."""
    rng = random.Random(seed)
    peak = max(rate(t / 10) for t in range(int(duration_s * 10) + 1)) or 1e-9
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak)
        if t >= duration_s:
            return out
        if rng.random() < rate(t) / peak:
            out.append(t)


def noisy_rates(rate_of_tau: Callable[[float], float], taus: list[float], bucket_s: float,
                seed: int) -> list[float]:
    """What a leader would have recorded: Poisson counts per bucket / bucket_s."""
    rng = random.Random(seed)
    return [_poisson(rng, rate_of_tau(tau + bucket_s / 2) * bucket_s) / bucket_s for tau in taus]


def _poisson(rng: random.Random, mean: float) -> int:
    if mean > 50:
        return max(0, round(rng.gauss(mean, math.sqrt(mean))))
    limit, k, p = math.exp(-mean), 0, rng.random()
    while p > limit:
        k += 1
        p *= rng.random()
    return k
