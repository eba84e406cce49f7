"""The rendered edge sends the OpenAI paths to the gateways, untranscoded and counted once by the
rate limit; with no gateway they still answer (503) in OpenAI's error shape. The behaviour on a
real Envoy is in tests/e2e/test_openai_sim.py."""

from __future__ import annotations

import subprocess

import yaml

from services.common.envoy_config import EnvoySettings, render
from services.localmesh import components as c

GATEWAY_PATHS = {("path", "/v1/chat/completions", "POST"), ("path", "/v1/completions", "POST"),
                 ("path", "/v1/models", "GET"), ("prefix", "/v1/models/", "GET")}


def _config(gateways: list[str]) -> dict:
    return yaml.safe_load(render(EnvoySettings(listen="127.0.0.1:18000", admin="127.0.0.1:18001",
                                               routers=["127.0.0.1:18020"], gateways=gateways)))


def _hcm(cfg: dict) -> dict:
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_openai_paths_go_to_the_gateways_untranscoded_and_not_rate_limited_twice():
    cfg = _config(["127.0.0.1:18060", "127.0.0.1:18061"])
    routes = _hcm(cfg)["route_config"]["virtual_hosts"][0]["routes"]
    to_gateway = [r for r in routes if r.get("route", {}).get("cluster") == "openai_gateway"]
    seen = set()
    for r in to_gateway:
        kind = "path" if "path" in r["match"] else "prefix"
        method = r["match"]["headers"][0]["string_match"]["exact"]
        seen.add((kind, r["match"][kind], method))
        disabled = {name for name, conf in r["typed_per_filter_config"].items() if conf.get("disabled")}
        assert disabled == {"envoy.filters.http.local_ratelimit", "envoy.filters.http.grpc_json_transcoder"}
        assert r["route"]["timeout"] == "0s"
        assert "reset" not in r["route"]["retry_policy"]["retry_on"].split(",")  # a POST may be generating
    assert seen == GATEWAY_PATHS
    cluster = next(x for x in cfg["static_resources"]["clusters"] if x["name"] == "openai_gateway")
    ports = [e["endpoint"]["address"]["socket_address"]["port_value"]
             for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]]
    assert ports == [18060, 18061]
    assert cluster["health_checks"][0]["http_health_check"]["path"] == "/health"


def test_local_replies_on_openai_paths_are_openai_errors():
    mapper = _hcm(_config([]))["local_reply_config"]["mappers"][0]
    error = mapper["body_format_override"]["json_format"]["error"]
    assert error["type"] == "server_error" and "%LOCAL_REPLY_BODY%" in error["message"]


def test_envoy_accepts_the_config_with_and_without_gateways(tmp_path):
    for gateways in ([], ["127.0.0.1:18060"]):
        path = tmp_path / "envoy.yaml"
        path.write_text(render(EnvoySettings(listen="127.0.0.1:18000", admin="127.0.0.1:18001",
                                             routers=["127.0.0.1:18020"], gateways=gateways,
                                             access_log=str(tmp_path / "access.log"))))
        result = subprocess.run([c.envoy_binary(), "--mode", "validate", "-c", str(path)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
