"""Prometheus exposition for every process: one /metrics endpoint on its own port."""

from __future__ import annotations

import logging

from prometheus_client import start_http_server

from .ports import check_port_free

log = logging.getLogger(__name__)

#: Latency buckets (seconds) shared by every histogram so dashboards line up across services.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)


def serve_metrics(address: str) -> str:
    """Start the /metrics HTTP endpoint; returns host:port, or '' when disabled (empty address)."""
    if not address:
        return ""
    host, _, port = address.rpartition(":")
    if int(port):
        check_port_free(host, int(port))  # the HTTP server listens with SO_REUSEADDR too
    server, _thread = start_http_server(int(port), addr=host)
    bound = server.server_address[1]
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return f"{host}:{bound}"
