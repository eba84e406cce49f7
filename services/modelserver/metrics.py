"""The model server's Prometheus metrics (defined once per process)."""

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

REQUESTS = Counter("meshserve_modelserver_requests_total",
                   "Generate calls by model and final gRPC status code", ["model", "code"])
PROMPT_TOKENS = Counter("meshserve_modelserver_prompt_tokens_total", "Prompt tokens", ["model"])
GENERATED_TOKENS = Counter("meshserve_modelserver_generated_tokens_total", "Generated tokens",
                           ["model"])
CACHED_TOKENS = Counter("meshserve_modelserver_cached_prompt_tokens_total",
                        "Prompt tokens served from the prefix cache", ["model"])
TTFT = Histogram("meshserve_modelserver_time_to_first_token_seconds", "Time to first token",
                 ["model"], buckets=LATENCY_BUCKETS)
ITL = Histogram("meshserve_modelserver_inter_token_latency_seconds",
                "Time between streamed chunks divided by their tokens", ["model"],
                buckets=LATENCY_BUCKETS)
E2E = Histogram("meshserve_modelserver_request_duration_seconds", "End-to-end Generate latency",
                ["model"], buckets=LATENCY_BUCKETS)
RUNNING = Gauge("meshserve_modelserver_running_sequences", "Sequences in the batch", ["model"])
WAITING = Gauge("meshserve_modelserver_waiting_requests", "Requests queued", ["model"])
KV_USED = Gauge("meshserve_modelserver_kv_blocks_used", "KV cache blocks in use", ["model"])
KV_TOTAL = Gauge("meshserve_modelserver_kv_blocks_total", "KV cache blocks in the pool", ["model"])
PREFIX_HIT_RATE = Gauge("meshserve_modelserver_prefix_cache_hit_rate",
                        "Prompt tokens found in the prefix cache / prompt tokens looked up, since start",
                        ["model"])
PREFIX_HIT_TOKENS = Counter("meshserve_modelserver_prefix_cache_hit_tokens_total",
                            "Prompt tokens the engine found in its prefix cache at admission", ["model"])
PREEMPTIONS = Counter("meshserve_modelserver_preemptions_total",
                      "Sequences preempted (KV blocks released, recomputed later)", ["model"])
TOKENS_PER_SECOND = Gauge("meshserve_modelserver_tokens_per_second",
                          "Generated tokens per second over the engine's recent window", ["model"])

_last_totals: dict[tuple[str, str], int] = {}


def follow_total(counter: Counter, model: str, total: int) -> None:
    """Advance a counter to an engine's monotonic total; a smaller total means the engine was
    reloaded, whose new total is all new increments."""
    key = (counter._name, model)  # noqa: SLF001 - the metric's own name keys the memory
    last = _last_totals.get(key, 0)
    delta = total - last if total >= last else total
    child = counter.labels(model)  # exists from the first report, at zero if nothing happened yet
    if delta > 0:
        child.inc(delta)
    _last_totals[key] = total
