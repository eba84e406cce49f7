"""The router's side of KV events: the index follows snapshots and numbered events, asks for a
snapshot after a gap, and the meshserve policy scores prefixes on it (with the same keys as the
engine) instead of the text guess; round robin and the text guess are unaffected."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass

from meshserve.v1 import modelserver_pb2 as pb

from services.cache import keys, runtime
from services.router.policy import RouteRequest, Settings, make_policy
from services.router.policy.kv_index import KvIndex
from services.router.policy.pipeline import MeshServePolicy
from services.router.policy.types import Load

NS = keys.namespace("w", "torch.float32", "layout", 4)
INFO = pb.KvCacheInfo(namespace=NS, block_size=4, tokenizer_digest="tok")


def _msg(events: list[tuple[int, int, int, list[bytes]]], snapshot: bool = False, epoch: int = 7) -> pb.KvEvents:
    msg = pb.KvEvents(model="m", info=INFO, epoch=epoch, snapshot=snapshot)
    for seq, kind, tier, ks in events:
        msg.events.add(seq=seq, kind=kind, tier=tier, block_keys=ks)
    return msg


STORED, REMOVED, CLEARED = pb.KV_EVENT_KIND_STORED, pb.KV_EVENT_KIND_REMOVED, pb.KV_EVENT_KIND_CLEARED
LOCAL, SHARED = pb.KV_TIER_LOCAL, pb.KV_TIER_SHARED


def test_index_follows_snapshot_and_events_and_detects_gaps():
    index = KvIndex()
    a, b, c = b"a" * 32, b"b" * 32, b"c" * 32
    assert not index.apply("s1/m", _msg([(1, STORED, LOCAL, [a])]))  # events before any snapshot
    assert index.apply("s1/m", _msg([(3, STORED, LOCAL, [a, b]), (3, STORED, SHARED, [c])], snapshot=True))
    assert index.match("s1/m", [a, b, c]) == (2, 1)
    assert index.apply("s1/m", _msg([(4, REMOVED, LOCAL, [b])]))
    assert index.match("s1/m", [a, b, c]) == (1, 0)  # b is gone, c follows b: the run stops
    assert not index.apply("s1/m", _msg([(6, STORED, LOCAL, [b])]))  # 5 was missed
    assert index.get("s1/m") is None and index.match("s1/m", [a]) == (0, 0)
    assert index.apply("s1/m", _msg([(9, STORED, LOCAL, [a])], snapshot=True))
    assert not index.apply("s1/m", _msg([(10, STORED, LOCAL, [b])], epoch=8))  # the engine restarted
    # another replica's shared blocks count for everyone of the same namespace
    index.apply("s1/m", _msg([(1, STORED, LOCAL, [a])], snapshot=True))
    index.apply("s2/m", _msg([(1, STORED, SHARED, [a, b])], snapshot=True))
    assert index.match("s1/m", [a, b]) == (1, 1)
    index.apply("s2/m", _msg([(2, CLEARED, SHARED, [])]))
    assert index.match("s1/m", [a, b]) == (1, 0)


@dataclass
class Ep:
    server_id: str
    region: str = "local"
    zone: str = "a"
    in_flight: int = 0

    @property
    def replica_id(self) -> str:
        return f"{self.server_id}/m"

    def load(self) -> Load:
        return Load(in_flight=self.in_flight, max_running=16, kv_blocks_total=100)

    def ejected(self, now: float) -> bool:
        return False


class WordTokenizer:
    """Stands in for the model's tokenizer: one token per word."""

    def encode(self, prompt: str, messages: object) -> list[int]:
        return [len(w) for w in prompt.split()]

    def public_tokens(self, messages: object, ids: object) -> int:
        return 0


def _policy() -> MeshServePolicy:
    policy = make_policy("meshserve")
    assert isinstance(policy, MeshServePolicy)
    policy.tokenizers._loaded["tok"] = WordTokenizer()  # type: ignore[assignment] # noqa: SLF001 - a stand-in
    policy.rng = random.Random(1)
    return policy


def _held(prompt: str, tenant: str = "") -> list[bytes]:
    ids = WordTokenizer().encode(prompt, ())
    n = (len(ids) - 1) // 4
    return keys.chain(NS, ids[:n * 4], 4, runtime.salt(tenant))


async def test_policy_routes_to_the_replica_that_really_holds_the_prefix():
    policy = _policy()
    eps = [Ep("s1"), Ep("s2"), Ep("s3")]
    prompt = " ".join(["alpha", "be", "gam"] * 6)
    # s2 holds the blocks; s1 was *sent* the prompt (the text guess would choose it) but evicted them
    policy.sent("s1/m", RouteRequest(model="m", text=prompt))
    for ep in eps:
        held = _held(prompt) if ep.server_id == "s2" else []
        assert policy.kv_events(ep.replica_id, _msg([(1, STORED, LOCAL, held)], snapshot=True), _never)
    req = RouteRequest(model="m", text=prompt, prompt=prompt)
    pick = policy.pick(eps, req, Settings())
    assert pick is not None and (pick.endpoint.server_id, pick.reason) == ("s2", "prefix")
    # another tenant's request has other keys: no replica holds them, so load decides
    other = RouteRequest(model="m", text=prompt, prompt=prompt, tenant="globex")
    eps[1].in_flight = 5
    pick = policy.pick(eps, other, Settings())
    assert pick is not None and pick.reason == "load" and pick.endpoint.server_id != "s2"
    # the text guess, where events are not used, still follows what was sent
    text = make_policy("meshserve_text")
    text.sent("s1/m", RouteRequest(model="m", text=prompt))
    pick = text.pick(eps, RouteRequest(model="m", text=prompt, prompt=prompt), Settings())
    assert pick is not None and pick.endpoint.server_id == "s1"


async def test_a_replica_without_events_falls_back_to_the_text_guess():
    policy = _policy()
    eps = [Ep("s1"), Ep("s2")]
    prompt = " ".join(["x"] * 40)
    policy.kv_events("s2/m", _msg([(1, STORED, LOCAL, _held(prompt))], snapshot=True), _never)
    policy.sent("s1/m", RouteRequest(model="m", text=prompt))
    pick = policy.pick(eps, RouteRequest(model="m", text=prompt, prompt=prompt), Settings())
    assert pick is not None and pick.endpoint.server_id == "s1"  # s1 has no events: text guess for all


async def test_the_tokenizer_is_fetched_once_and_checked_against_its_digest():
    policy = make_policy("meshserve")
    assert isinstance(policy, MeshServePolicy)
    calls = 0

    async def fetch() -> pb.GetTokenizerResponse:
        nonlocal calls
        calls += 1
        return pb.GetTokenizerResponse(digest="tok", files={"tokenizer.json": b"{}"})

    policy.kv_events("s1/m", _msg([], snapshot=True), fetch)
    policy.kv_events("s1/m", _msg([], snapshot=True), fetch)
    await asyncio.sleep(0.05)
    assert calls == 1
    assert "tok" not in policy.tokenizers._loaded  # noqa: SLF001 - the files' digest is not "tok"


async def _never() -> pb.GetTokenizerResponse:
    raise AssertionError("no fetch expected")
