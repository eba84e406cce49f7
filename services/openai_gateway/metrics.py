"""The OpenAI gateway's Prometheus metrics (defined once per process).

Labels stay bounded: `endpoint` is one of the gateway's routes and `status` an HTTP status; the
model is not a label here (the routers count per model), so a client that sends random model
names cannot grow the series.
"""

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

REQUESTS = Counter("meshserve_openai_requests_total",
                   "OpenAI requests by endpoint, HTTP status and whether they streamed",
                   ["endpoint", "status", "stream"])
IN_FLIGHT = Gauge("meshserve_openai_in_flight", "OpenAI requests being answered", ["endpoint"])
TTFT = Histogram("meshserve_openai_time_to_first_token_seconds",
                 "Arrival to the first token the gateway received, per endpoint", ["endpoint"],
                 buckets=LATENCY_BUCKETS)
DURATION = Histogram("meshserve_openai_request_seconds", "Arrival to the answer's end, per endpoint",
                     ["endpoint"], buckets=LATENCY_BUCKETS)
RESUMES = Counter("meshserve_openai_resumes_total",
                  "Streams the gateway continued on another router after theirs broke")
STREAM_ERRORS = Counter("meshserve_openai_stream_errors_total",
                        "Streams that failed after the first chunk reached the HTTP client, by reason",
                        ["reason"])
