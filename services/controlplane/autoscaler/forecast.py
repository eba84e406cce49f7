"""Holt-Winters (additive trend and season) over a bucketed request-rate series.

Written here rather than taken from statsmodels: the model is a few lines, the leader updates it
once per bucket in O(1) and refits it on a small grid when it takes over or a season ends, and
statsmodels would bring scipy and pandas into the control plane for it. Missing buckets (NaN:
nothing was measured, e.g. no leader) are filled with the model's own one-step forecast.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

ALPHAS = (0.1, 0.3, 0.5, 0.8)
BETAS = (0.0, 0.05, 0.2)
GAMMAS = (0.1, 0.3, 0.6)


@dataclass
class HoltWinters:
    season: int
    alpha: float = 0.3
    beta: float = 0.05
    gamma: float = 0.3
    level: float = 0.0
    trend: float = 0.0
    seasonals: list[float] = field(default_factory=list)
    seen: int = 0  # observations absorbed (including the two seasons of initialisation)
    sse: float = 0.0  # squared one-step errors from the second season on

    @classmethod
    def start(cls, series: Sequence[float], season: int, alpha: float = 0.3, beta: float = 0.05,
              gamma: float = 0.3) -> HoltWinters | None:
        """Initialised from the first two seasons and run over the rest; None when the series
        holds fewer than two seasons of numbers."""
        values = _filled(series)
        if season < 2 or len(values) < 2 * season:
            return None
        first = values[:season]
        second = values[season:2 * season]
        m1, m2 = sum(first) / season, sum(second) / season
        model = cls(season, alpha, beta, gamma, level=m1, trend=(m2 - m1) / season,
                    seasonals=[v - m1 for v in first], seen=season)
        for v in series[season:]:
            model.update(v)
        return model

    @classmethod
    def fit(cls, series: Sequence[float], season: int) -> HoltWinters | None:
        """The grid's parameters with the smallest one-step squared error over the series."""
        best: HoltWinters | None = None
        for a in ALPHAS:
            for b in BETAS:
                for g in GAMMAS:
                    model = cls.start(series, season, a, b, g)
                    if model is not None and (best is None or model.sse < best.sse):
                        best = model
        return best

    def one_step(self) -> float:
        return self.level + self.trend + self.seasonals[self.seen % self.season]

    def update(self, value: float) -> None:
        expected = self.one_step()
        if not math.isfinite(value):
            value = max(0.0, expected)
        elif self.seen >= self.season:  # the second season on: what the grid is judged by
            self.sse += (value - expected) ** 2
        i = self.seen % self.season
        last_level = self.level
        self.level = self.alpha * (value - self.seasonals[i]) + (1 - self.alpha) * (
            self.level + self.trend)
        self.trend = self.beta * (self.level - last_level) + (1 - self.beta) * self.trend
        self.seasonals[i] = self.gamma * (value - self.level) + (1 - self.gamma) * self.seasonals[i]
        self.seen += 1

    def forecast(self, steps: int) -> float:
        """The rate `steps` buckets after the last one absorbed (1 = the next), never negative."""
        i = (self.seen + steps - 1) % self.season
        return max(0.0, self.level + steps * self.trend + self.seasonals[i])


def _filled(series: Sequence[float]) -> list[float]:
    """NaNs in the initialisation seasons become the mean of the numbers (or 0)."""
    numbers = [v for v in series if math.isfinite(v)]
    mean = sum(numbers) / len(numbers) if numbers else 0.0
    return [v if math.isfinite(v) else mean for v in series]
