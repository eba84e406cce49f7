"""The shared cache through a whole mesh: two SmolLM2 servers sharing a real redis-server, a router
that scores prefixes on their KV events (and recovers them by snapshot after a restart), the
response cache with `served_by.cached`, and `meshctl cache stats|flush`."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from meshserve.v1 import inference_pb2, inference_pb2_grpc

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, running_mesh, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.model]

MODEL = "smolc"
OPTIONS = ["threads=1", "kv_cache_blocks=48", "max_context=1024", "warmup=false"]
PREFIXES = [f"Background {n}: " + f"the {n} valley holds orchards, mills and a river ferry. " * 16
            for n in ("north", "south", "east")]  # ~190 tokens each: 2 full 64-token blocks


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("cache-mesh"), base_port=0, lease_ttl=3,
                    cache_store_bytes=64 << 20,
                    servers=[ServerPlan(f"server-{i}", [f"{MODEL}=torch:embedded"], engine_options=OPTIONS)
                             for i in range(2)])
    with running_mesh(plan) as m:
        yield m


def _generate(mesh: LocalMesh, req: inference_pb2.GenerateRequest) -> inference_pb2.GenerateResponse:
    with grpc.insecure_channel(mesh.routers[0]) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).Generate(req, timeout=120)


def _router_log(mesh: LocalMesh) -> str:
    return (mesh.sup.log_dir / "router0.log").read_text(errors="replace")


def _ctl(mesh: LocalMesh, *args: str) -> str:
    out = meshctl("--controlplane", mesh.controlplane, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_router_scores_on_kv_events_and_recovers_them_after_a_restart(mesh: LocalMesh):
    homes = {}
    for prefix in PREFIXES:
        answer = _generate(mesh, ask(prefix + "Question one?", 2, model=MODEL, bypass_response_cache=True))
        homes[prefix] = answer.served_by.server_id
    wait_for(lambda: "prefix scoring on KV events" in _router_log(mesh), 60, "the router to load the tokenizer")
    # a new router process knows nothing it sent: it learns what each server holds from snapshots
    mesh.sup.stop_child(mesh.children["router0"])
    mesh.start_router(0)
    wait_for(lambda: _router_log(mesh).count("prefix scoring on KV events") >= 2, 60,
             "the restarted router to load the tokenizer")
    for prefix, home in homes.items():
        answer = _generate(mesh, ask(prefix + "Question two?", 2, model=MODEL, bypass_response_cache=True))
        assert answer.served_by.server_id == home, "routed away from the server that holds the prefix"
        assert answer.usage.cached_tokens >= 128


def test_deterministic_answers_come_from_the_response_cache(mesh: LocalMesh):
    first = _generate(mesh, ask("Name a colour.", 4, model=MODEL, tenant="acme"))
    assert not first.served_by.cached
    again = _generate(mesh, ask("Name a colour.", 4, model=MODEL, tenant="acme"))
    assert again.served_by.cached and again.text == first.text and list(again.token_ids) == list(first.token_ids)
    assert not _generate(mesh, ask("Name a colour.", 4, model=MODEL, tenant="globex")).served_by.cached
    assert not _generate(mesh, ask("Name a colour.", 4, model=MODEL, tenant="acme",
                                   bypass_response_cache=True)).served_by.cached
    sampled = ask("Name a colour.", 4, model=MODEL, tenant="acme")
    sampled.sampling.temperature = 0.9
    assert not _generate(mesh, sampled).served_by.cached
    sampled.sampling.temperature = 0.9
    sampled.sampling.seed = 7
    _generate(mesh, sampled)
    assert _generate(mesh, sampled).served_by.cached  # seeded: deterministic


def test_meshctl_cache_stats_and_flush(mesh: LocalMesh):
    _generate(mesh, ask("Name a fruit.", 3, model=MODEL))
    assert _generate(mesh, ask("Name a fruit.", 3, model=MODEL)).served_by.cached
    table = _ctl(mesh, "cache", "stats")
    assert "shared store" in table and ": up" in table
    for tier in ("local", "shared", "response"):
        assert tier in table
    stats = json.loads(_ctl(mesh, "-o", "json", "cache", "stats"))
    servers = stats["servers"]
    assert len(servers) == 2 and not stats["failed"]
    response_hits = sum(int(t.get("hits", 0)) for s in servers for m in s["models"] for t in m["tiers"]
                        if t["tier"] == "response")
    assert response_hits >= 1
    assert "shared store entries" in _ctl(mesh, "cache", "flush", "--model", MODEL)
    assert not _generate(mesh, ask("Name a fruit.", 3, model=MODEL)).served_by.cached
    bad = meshctl("--controlplane", mesh.controlplane, "cache", "flush", "--tenant", "no spaces allowed")
    assert bad.returncode == 1 and "tenant" in bad.stderr
