"""The autoscaler's Prometheus metrics (on the control plane's /metrics; the leader's are live).

Label values are bounded: models, and short reason / limit codes (the words go to logs and to
`meshctl autoscale explain`)."""

import contextlib

from prometheus_client import Counter, Gauge

DESIRED = Gauge("meshserve_autoscaler_desired_replicas",
                "Replicas the autoscaler decided, by model", ["model"])
ACTUAL = Gauge("meshserve_autoscaler_actual_replicas", "Replicas READY, by model", ["model"])
DECISIONS = Counter("meshserve_autoscaler_decisions_total",
                    "Changes of desired replicas, by direction and reason (activation, demand, panic, "
                    "ttft_slo, forecast, idle, min, max, budget)", ["model", "direction", "reason"])
LIMITED = Gauge("meshserve_autoscaler_limit_binding",
                "1 while this limit caps the model's replicas (max_replicas, budget, scale_up_rate, "
                "scale_down_rate, cooldown)", ["model", "limit"])
DEMAND = Gauge("meshserve_autoscaler_demand",
               "Requests in flight or waiting, averaged over the stable and panic windows",
               ["model", "window"])
PANIC = Gauge("meshserve_autoscaler_panic", "1 while the model is in panic mode", ["model"])
FORECAST = Gauge("meshserve_autoscaler_forecast_rps",
                 "Request rate the forecast expects within the lead time", ["model"])
FORECAST_FLOOR = Gauge("meshserve_autoscaler_forecast_floor_replicas",
                       "Replicas the forecast asks for ahead of load", ["model"])
READY_TIME = Gauge("meshserve_autoscaler_ready_time_seconds",
                   "Measured time from placement to READY (moving average)", ["model"])

LIMIT_CODES = ("max_replicas", "budget", "scale_up_rate", "scale_down_rate", "cooldown")
PER_MODEL = (DESIRED, ACTUAL, PANIC, FORECAST, FORECAST_FLOOR, READY_TIME)


def forget(model: str) -> None:
    """A model no longer autoscaled: its series disappear instead of freezing."""
    for gauge in PER_MODEL:
        with contextlib.suppress(KeyError):
            gauge.remove(model)
    for window in ("stable", "panic"):
        with contextlib.suppress(KeyError):
            DEMAND.remove(model, window)
    for code in LIMIT_CODES:
        with contextlib.suppress(KeyError):
            LIMITED.remove(model, code)
