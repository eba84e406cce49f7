"""The router's Prometheus metrics (defined once per process)."""

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

#: Router overhead is sub-millisecond when healthy: finer buckets than the shared latency ones.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                    0.1)

ATTEMPTS = Counter("meshserve_router_attempts_total",
                   "Upstream calls by model, server and how they ended (OK, a gRPC status name, "
                   "ABANDONED by the router, CANCELLED with the client)", ["model", "server", "outcome"])
REQUESTS = Counter("meshserve_router_requests_total", "Requests by model, final status and priority",
                   ["model", "code", "priority"])
PICKS = Counter("meshserve_router_picks_total",
                "Servers picked, by server and reason (affinity, prefix, load, spill, least_load, "
                "round_robin)", ["server", "reason"])
RETRIES = Counter("meshserve_router_retries_total",
                  "Attempts retried on another server before the first token", ["model"])
MIGRATIONS = Counter("meshserve_router_migrations_total",
                     "Streams continued on another server after tokens were relayed", ["model"])
RETRY_BUDGET_EXHAUSTED = Counter("meshserve_router_retry_budget_exhausted_total",
                                 "Retries or migrations refused by the retry budget", ["model"])
SHED = Counter("meshserve_router_shed_total",
               "Requests refused or timed out by admission control, by priority and why "
               "(saturated, queue_full, queue_timeout, activation_queue_full, activation_timeout)",
               ["model", "priority", "reason"])
QUEUED = Gauge("meshserve_router_queue_depth", "STANDARD requests waiting for a server with room",
               ["model"])
QUEUE_WAIT = Histogram("meshserve_router_queue_wait_seconds",
                       "Time STANDARD requests waited in the router's queue", ["model"],
                       buckets=LATENCY_BUCKETS)
WAITING_FOR_REPLICA = Gauge("meshserve_router_waiting_for_replica",
                            "Requests waiting for a first replica of a model scaled to zero",
                            ["model"])
ACTIVATION_WAIT = Histogram("meshserve_router_activation_wait_seconds",
                            "Time requests for a model scaled to zero waited for its first replica",
                            ["model"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120,
                                                300))
OVERHEAD = Histogram("meshserve_router_overhead_seconds",
                     "Time the router adds: 'route' = request arrival to the upstream call issued "
                     "(queueing excluded), 'relay' = per chunk, upstream receipt to hand-off",
                     ["stage"], buckets=OVERHEAD_BUCKETS)
TTFT = Histogram("meshserve_router_time_to_first_token_seconds",
                 "Time from request arrival to the first token sent back", ["model"],
                 buckets=LATENCY_BUCKETS)
DURATION = Histogram("meshserve_router_request_duration_seconds", "Whole request duration",
                     ["model"], buckets=LATENCY_BUCKETS)

#: The hot path's fixed children, resolved once.
OVERHEAD_ROUTE = OVERHEAD.labels("route")
OVERHEAD_RELAY = OVERHEAD.labels("relay")


#: Counters every model starts at zero (their rates and ratios then exist before the first event).
_PER_MODEL = (RETRIES, MIGRATIONS, RETRY_BUDGET_EXHAUSTED)


def init_model(model: str) -> None:
    """Create a model's per-model children at zero, once it is known (idempotent)."""
    for metric in _PER_MODEL:
        child(metric, model)
    child(QUEUED, model)
    child(QUEUE_WAIT, model)


def forget_replica(replica_id: str) -> None:
    """A replica (`server/model`) left: drop its per-server series, so label values follow the
    membership instead of every server that ever existed (servers are pods; names churn)."""
    server, _, model = replica_id.rpartition("/")
    for metric, matches in ((ATTEMPTS, lambda lv: lv[0] == model and lv[1] == server),
                            (PICKS, lambda lv: lv[0] == server)):
        for labels in _label_sets(metric):
            if matches(labels):
                metric.remove(*labels)
    child.cache_clear()


def _label_sets(metric) -> list[tuple[str, ...]]:
    names = metric._labelnames  # noqa: SLF001 - prometheus_client lists children only by sample
    seen = set()
    for family in metric.collect():
        for s in family.samples:
            seen.add(tuple(s.labels.get(n, "") for n in names))
    return sorted(seen)


@lru_cache(maxsize=4096)
def child(metric, *labels: str):
    """`metric.labels(*labels)`, memoised: prometheus_client checks and locks on every call, and
    the request path asks for the same few children each time. Label values here are bounded
    (models, current servers, codes, priorities, reasons); `forget_replica` drops a departed
    server's children (and clears this memo)."""
    return metric.labels(*labels)
