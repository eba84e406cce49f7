import subprocess

import pytest
import yaml

from services.common.envoy_config import EnvoySettings, render
from services.localmesh.components import envoy_binary


def settings(**kw):
    base = dict(listen="127.0.0.1:18000", admin="127.0.0.1:18001",
                routers=["127.0.0.1:18020", "127.0.0.1:18021"])
    base.update(kw)
    return EnvoySettings(**base)


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
