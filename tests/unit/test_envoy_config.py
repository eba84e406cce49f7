import dataclasses
import subprocess
from typing import Any

import pytest
import yaml

from services.common.envoy_config import EnvoySettings, render
from services.localmesh.components import envoy_binary


def settings(**kw: Any) -> EnvoySettings:
    base = EnvoySettings(listen="127.0.0.1:18000", admin="127.0.0.1:18001",
                         routers=["127.0.0.1:18020", "127.0.0.1:18021"])
    return dataclasses.replace(base, **kw)


def test_render_fills_routers_and_keeps_admin_on_loopback():
    cfg = yaml.safe_load(render(settings()))
    assert cfg["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    cluster = cfg["static_resources"]["clusters"][0]
    eps = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
    assert [e["endpoint"]["address"]["socket_address"]["port_value"] for e in eps] == [18020, 18021]
    assert cluster["health_checks"][0]["grpc_health_check"]["service_name"] == \
        "meshserve.v1.InferenceService"
    route = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
    assert route["timeout"] == "0s"
    assert "unavailable" in route["retry_policy"]["retry_on"]


def test_render_refuses_nonsense():
    with pytest.raises(ValueError):
        render(settings(routers=[]))
    with pytest.raises(ValueError):
        render(settings(listen="nope"))
    with pytest.raises(FileNotFoundError, match="make gen"):
        render(settings(descriptor="/nonexistent.pb"))


def test_envoy_itself_accepts_the_config(tmp_path):
    for kind, routers in (("STATIC", ["127.0.0.1:18020"]), ("STRICT_DNS", ["routers.meshserve:8001"])):
        path = tmp_path / f"{kind}.yaml"
        path.write_text(render(settings(cluster_type=kind, routers=routers)))
        result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr


def _route(cfg):
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["route_config"]["virtual_hosts"][0]["routes"][0]["route"]


def _filters(cfg):
    return cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]["http_filters"]


def test_rate_limit_is_on_with_a_generous_default_and_configurable():
    cfg = yaml.safe_load(render(settings()))
    rl = _filters(cfg)[0]
    assert rl["name"] == "envoy.filters.http.local_ratelimit"
    conf = rl["typed_config"]
    assert conf["token_bucket"]["tokens_per_fill"] == 100_000
    assert conf["rate_limited_as_resource_exhausted"] is True
    assert conf["filter_enforced"]["default_value"]["numerator"] == 100
    conf = _filters(yaml.safe_load(render(settings(rate_limit_per_s=5, rate_limit_burst=2))))[0][
        "typed_config"]
    assert conf["token_bucket"]["tokens_per_fill"] == 5 and conf["token_bucket"]["max_tokens"] == 2
    off = _filters(yaml.safe_load(render(settings(rate_limit_per_s=0))))[0]["typed_config"]
    assert off["filter_enabled"]["default_value"]["numerator"] == 0
    with pytest.raises(ValueError):
        render(settings(rate_limit_per_s=-1))


def test_session_ring_hash_is_optional():
    cfg = yaml.safe_load(render(settings()))
    assert cfg["static_resources"]["clusters"][0]["lb_policy"] == "LEAST_REQUEST"
    assert "hash_policy" not in _route(cfg)
    cfg = yaml.safe_load(render(settings(session_ring_hash=True, session_header="x-user")))
    assert cfg["static_resources"]["clusters"][0]["lb_policy"] == "RING_HASH"
    assert _route(cfg)["hash_policy"] == [{"header": {"header_name": "x-user"}}]
    with pytest.raises(ValueError):
        render(settings(session_ring_hash=True, session_header="X-Bad Header"))


def test_envoy_accepts_the_optional_features(tmp_path):
    path = tmp_path / "ring.yaml"
    path.write_text(render(settings(session_ring_hash=True, rate_limit_per_s=3)))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
