"""The control plane's Prometheus metrics (defined once per process)."""

from prometheus_client import Counter, Gauge, Histogram

from services.common.metrics import LATENCY_BUCKETS

SERVERS = Gauge("meshserve_controlplane_servers", "Servers by health state", ["state"])
PLACEMENTS_DESIRED = Gauge("meshserve_controlplane_placements_desired",
                           "Replicas wanted, by model", ["model"])
PLACEMENTS_READY = Gauge("meshserve_controlplane_placements_ready", "Replicas READY, by model",
                         ["model"])
FAILOVERS = Counter("meshserve_controlplane_failovers_total",
                    "Placements moved off a server that died, turned unhealthy or was drained",
                    ["reason"])
CHECKS = Counter("meshserve_controlplane_health_checks_total", "Health check rounds by result",
                 ["result"])
PROBES = Counter("meshserve_controlplane_generation_probes_total",
                 "One-token generation probes by result", ["result"])
CHECK_LATENCY = Histogram("meshserve_controlplane_health_check_seconds",
                          "Time one server's health check round took", buckets=LATENCY_BUCKETS)
LEADER_CHANGES = Counter("meshserve_controlplane_leader_changes_total",
                         "Times this replica gained or lost leadership", ["event"])
IS_LEADER = Gauge("meshserve_controlplane_is_leader", "1 while this replica leads")
