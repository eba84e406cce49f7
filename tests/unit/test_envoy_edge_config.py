"""The rendered edge config keeps its guarantees: only the public API routes to routers, Envoy
answers the rest, outlier detection ignores deliberate statuses, windows stay bounded (the e2e
tests in tests/e2e/test_edge.py and test_flow_control.py show the behaviour on a real Envoy)."""

from __future__ import annotations

import yaml

from services.common.envoy_config import EnvoySettings, render


def _config() -> dict:
    return yaml.safe_load(render(EnvoySettings(listen="127.0.0.1:18000", admin="127.0.0.1:18001",
                                               routers=["127.0.0.1:18020"])))


def _hcm(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]


def test_only_public_grpc_services_route_to_routers():
    routes = _hcm(_config())["route_config"]["virtual_hosts"][0]["routes"]
    to_routers = [r["match"]["prefix"] for r in routes if r.get("route", {}).get("cluster") == "routers"]
    assert to_routers == ["/meshserve.v1.InferenceService/", "/inference.GRPCInferenceService/",
                          "/meshserve.v1.JobService/", "/grpc.reflection.v1alpha.ServerReflection/",
                          "/grpc.reflection.v1.ServerReflection/", "/grpc.health.v1.Health/"]
    assert all(r["match"]["headers"][0]["name"] == "content-type" for r in routes
               if r.get("route", {}).get("cluster") == "routers")
    assert routes[-1]["match"] == {"prefix": "/"} and routes[-1]["direct_response"]["status"] == 404
    allowed = {r["match"]["path"]: {h["header"]["key"]: h["header"]["value"]
                                    for h in r["response_headers_to_add"]}["allow"]
               for r in routes if r.get("direct_response", {}).get("status") == 405}
    assert allowed == {"/v1/generate": "POST", "/v1/generate:stream": "POST", "/v1/models": "GET",
                       "/v1/meshserve/models": "GET", "/v1/chat/completions": "POST", "/v1/completions": "POST"}


def test_outlier_detection_counts_only_local_origin_errors():
    od = _config()["static_resources"]["clusters"][0]["outlier_detection"]
    assert od["split_external_local_origin_errors"] is True
    assert od["enforcing_consecutive_local_origin_failure"] == 100
    for detector in ("enforcing_consecutive_5xx", "enforcing_consecutive_gateway_failure",
                     "enforcing_success_rate", "enforcing_failure_percentage"):
        assert od[detector] == 0, detector


def test_http2_windows_and_buffers_are_bounded():
    cfg = _config()
    downstream = _hcm(cfg)["http2_protocol_options"]
    assert downstream["initial_stream_window_size"] <= 256 * 1024
    cluster = cfg["static_resources"]["clusters"][0]
    upstream = cluster["typed_extension_protocol_options"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicit_http_config"][
        "http2_protocol_options"]
    assert upstream["initial_stream_window_size"] == 64 * 1024
    # Unread streams on one connection can never use up the window the others need.
    assert (upstream["max_concurrent_streams"] * upstream["initial_stream_window_size"]
            <= upstream["initial_connection_window_size"] // 2)
    assert cluster["per_connection_buffer_limit_bytes"] <= 1024 * 1024
    assert cfg["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] <= 1024 * 1024
