"""The shared cache through a whole mesh: two SmolLM2 servers sharing a real redis-server. Blocks
computed on one server are fetched by the other (greedy output identical), never across tenants
(a public system prompt only when opted in); a bad block or a store that is down only costs a
recompute and shows in metrics; a router scores prefixes on the servers' KV events (recovered by
snapshot after a restart); the response cache answers with `served_by.cached`; `meshctl cache
stats|flush`. Servers are called directly where a test needs a given server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial

import grpc
import pytest
import redis
from meshserve.v1 import common_pb2, inference_pb2, inference_pb2_grpc, modelserver_pb2, modelserver_pb2_grpc

from services.localmesh.cache_store import redis_url
from services.localmesh.components import grpc_serving
from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, metrics_text, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.model]

MODEL = "smolc"
OPTIONS = ["threads=1", "kv_cache_blocks=48", "max_context=1024", "warmup=false"]
PREFIXES = [f"Background {n}: " + f"the {n} valley holds orchards, mills and a river ferry. " * 16
            for n in ("north", "south", "east")]  # ~190 tokens each: 2 full 64-token blocks


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    """Started piece by piece so the two servers load the model at the same time."""
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("cache-mesh"), base_port=0, lease_ttl=3,
                    cache_store_bytes=64 << 20,
                    servers=[ServerPlan(f"server-{i}", [f"{MODEL}=torch:embedded"], engine_options=OPTIONS)
                             for i in range(2)])
    m = LocalMesh(plan)
    m.ports.check()
    m.sup.new_run()
    try:
        m.start_etcd()
        m.start_cache_store()
        m.start_controlplane(0)
        children = [m.start_server(s, wait=False) for s in plan.servers]
        for child, s in zip(children, plan.servers, strict=True):
            m.sup.wait_ready(child, partial(grpc_serving, m.servers[s.server_id]), plan.load_timeout_s, "serving")
        m.start_router(0)
        yield m
    finally:
        m.stop()
        for name, child in m.children.items():
            assert not child.alive(), f"{name} (pid {child.pid}) survived the mesh stop"


def _direct(mesh: LocalMesh, server: str, prompt: str = PREFIXES[0], tenant: str = "",
            system: str = "", share: bool = False) -> tuple[list[int], int]:
    """Greedy ids and cached prompt tokens from one given server (no router, no response cache)."""
    req = modelserver_pb2.ModelServerServiceGenerateRequest(
        request_id="direct", model=MODEL, tenant=tenant, share_system_prompt=share, bypass_response_cache=True,
        sampling=common_pb2.SamplingParams(max_tokens=3))
    if system:
        req.messages.add(role="system", content=system)
        req.messages.add(role="user", content=prompt)
    else:
        req.prompt = prompt
    ids, cached = [], -1
    with grpc.insecure_channel(mesh.servers[server]) as channel:
        for chunk in modelserver_pb2_grpc.ModelServerServiceStub(channel).Generate(req, timeout=120):
            ids += chunk.token_ids
            if chunk.HasField("usage"):
                cached = chunk.usage.cached_tokens
    return ids, cached


def _metric(mesh: LocalMesh, server: str, line_start: str) -> float:
    for line in metrics_text(mesh.metrics[server]).splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _store(mesh: LocalMesh) -> redis.Redis:
    return redis.Redis.from_url(redis_url(mesh.cache_store))


def _flush(mesh: LocalMesh) -> None:
    """Empty pools and store: what `meshctl cache flush` does."""
    _ctl(mesh, "cache", "flush")


def test_blocks_are_shared_across_servers_but_never_across_tenants(mesh: LocalMesh):
    _flush(mesh)
    shared_hits = 'meshserve_cache_hits_total{model="smolc",tier="shared"}'
    reference, cached = _direct(mesh, "server-0", tenant="acme")
    assert cached == 0
    wait_for(lambda: len(_store(mesh).keys("ms:kv1:*")) >= 2, 30, "blocks written to the store")
    before = _metric(mesh, "server-1", shared_hits)
    for tenant in ("globex", "initech"):  # interleaved tenants: acme's blocks are in the store
        assert _direct(mesh, "server-1", tenant=tenant)[1] == 0
        assert _direct(mesh, "server-0", tenant=tenant + "x")[1] == 0
    assert _metric(mesh, "server-1", shared_hits) == before  # 0 cross-tenant hits
    ids, cached = _direct(mesh, "server-1", tenant="acme")
    assert ids == reference and cached >= 128  # fetched, not computed; the same greedy answer
    assert _metric(mesh, "server-1", shared_hits) >= before + 2


def test_a_public_system_prompt_is_shared_only_when_opted_in(mesh: LocalMesh):
    _flush(mesh)
    system = PREFIXES[1]
    _direct(mesh, "server-0", "Name one river.", tenant="acme", system=system, share=True)
    wait_for(lambda: len(_store(mesh).keys("ms:kv1:*")) >= 2, 30, "blocks written to the store")
    assert _direct(mesh, "server-1", "Name one river.", tenant="globex", system=system, share=True)[1] >= 128
    assert _direct(mesh, "server-1", "Name one river.", tenant="initech", system=system)[1] == 0


def test_a_bad_block_or_a_store_that_is_down_costs_only_a_recompute(mesh: LocalMesh):
    _flush(mesh)
    reference, _ = _direct(mesh, "server-0", PREFIXES[2])
    client = _store(mesh)
    wait_for(lambda: len(client.keys("ms:kv1:*")) >= 2, 30, "blocks written to the store")
    for name in client.keys("ms:kv1:*"):  # one byte of the stored token ids flipped: must not verify
        stored = client.get(name)
        assert isinstance(stored, bytes)
        value = bytearray(stored)
        value[100] ^= 0xFF
        client.set(name, bytes(value))
    ids, cached = _direct(mesh, "server-1", PREFIXES[2])
    assert ids == reference and cached == 0
    rejected = 'meshserve_cache_errors_total{model="smolc",reason="verify_failed",tier="shared"}'
    assert _metric(mesh, "server-1", rejected) >= 1
    mesh.sup.stop_child(mesh.children["cache-store"])
    try:
        ids, cached = _direct(mesh, "server-0", PREFIXES[2] + " More.", tenant="other")
        assert ids and cached == 0
        assert _metric(mesh, "server-0", "meshserve_cache_store_up") == 0.0
        assert not _generate(mesh, ask("Name a tree.", 2, model=MODEL)).served_by.cached
    finally:
        mesh.start_cache_store()
        wait_for(lambda: all(_stats(mesh, s).store_up for s in mesh.servers), 60, "servers to see the store again",
                 interval=0.5)


def _stats(mesh: LocalMesh, server: str) -> modelserver_pb2.GetCacheStatsResponse:
    with grpc.insecure_channel(mesh.servers[server]) as channel:
        return modelserver_pb2_grpc.ModelServerServiceStub(channel).GetCacheStats(
            modelserver_pb2.GetCacheStatsRequest(), timeout=10)


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
    _flush(mesh)
    homes = {}
    for prefix in PREFIXES:
        answer = _generate(mesh, ask(prefix + "Question one?", 2, model=MODEL, bypass_response_cache=True))
        homes[prefix] = answer.served_by.server_id
    wait_for(lambda: "prefix scoring on KV events" in _router_log(mesh), 60, "the router to load the tokenizer")
    # a new router process knows nothing it sent: it learns what each server holds from snapshots
    snapshots = _router_log(mesh).count("KV snapshot from replica")
    mesh.sup.stop_child(mesh.children["router0"])
    mesh.start_router(0)
    wait_for(lambda: _router_log(mesh).count("prefix scoring on KV events") >= 2, 60,
             "the restarted router to load the tokenizer")
    wait_for(lambda: _router_log(mesh).count("KV snapshot from replica") >= snapshots + 2, 60,
             "the restarted router's KV snapshots from both servers")
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
