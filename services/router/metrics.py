"""The router's Prometheus metrics (defined once per process)."""

from prometheus_client import Counter, Histogram

from services.common.metrics import LATENCY_BUCKETS

REQUESTS = Counter("meshserve_router_requests_total", "Requests by model, final status and priority",
                   ["model", "code", "priority"])
PICKS = Counter("meshserve_router_picks_total", "Servers picked, by server and reason",
                ["server", "reason"])
RETRIES = Counter("meshserve_router_retries_total", "Attempts retried on another server", ["model"])
TTFT = Histogram("meshserve_router_time_to_first_token_seconds",
                 "Time from request arrival to the first token sent back", ["model"],
                 buckets=LATENCY_BUCKETS)
DURATION = Histogram("meshserve_router_request_duration_seconds", "Whole request duration",
                     ["model"], buckets=LATENCY_BUCKETS)
