"""The job store on a real 3-node JetStream cluster (replicas 3): compare-and-set fences stale
writers, outcomes are written once, and losing one member loses nothing."""

from __future__ import annotations

import asyncio

import nats.errors
import pytest

from services.jobs.store import JOBS, OUT, WORK, JobStore, StoreSettings
from tests.helpers import retry
from tests.jobs_helpers import JetStreamCluster

pytestmark = pytest.mark.e2e


@pytest.fixture
def cluster(tmp_path):
    js = JetStreamCluster(tmp_path / "js", nodes=3)
    js.start()
    try:
        yield js
    finally:
        js.stop()


async def store_on(cluster: JetStreamCluster, name: str) -> JobStore:
    store = JobStore(StoreSettings(servers=cluster.urls, replicas=3, timeout_s=3.0))
    await retry(lambda: store.connect(name), attempts=40, delay=0.25)
    # fresh R3 streams answer writes only once their leaders are elected and known on every node
    # (until then: no responders, which the store reports as UNAVAILABLE)
    await retry(lambda: store.create(JOBS, f"probe.{name}", b""), attempts=120, delay=0.25)
    return store


async def test_a_stale_writer_is_fenced_and_outcomes_are_written_once(cluster):
    a, b = await store_on(cluster, "a"), await store_on(cluster, "b")
    try:
        first = await a.create(JOBS, "job.x", b"queued")
        assert first is not None and await b.create(JOBS, "job.x", b"again") is None
        mine = await a.cas(JOBS, "job.x", b"running:a", first)
        assert mine is not None
        # b read the old revision (say a's ack wait ran out and b took the job over from there)
        assert await b.cas(JOBS, "job.x", b"running:b", first) is None
        assert await b.cas(JOBS, "job.x", b"done:b", mine) is not None  # b re-read and won
        assert await a.cas(JOBS, "job.x", b"done:a", mine) is None  # a's late result is refused
        assert (await a.get(JOBS, "job.x"))[0] == b"done:b"  # type: ignore[index]
        written = await asyncio.gather(*(s.create(OUT, "batch-1.7", s.settings.servers[0].encode())
                                         for s in (a, b, a, b)))
        assert sum(w is not None for w in written) == 1
        assert await a.count(f"KV_{OUT}", f"$KV.{OUT}.batch-1.*") == 1
    finally:
        await a.close()
        await b.close()


async def test_losing_one_member_loses_nothing(cluster):
    store = await store_on(cluster, "w")
    try:
        async def before_loss() -> None:
            # a fresh R3 stream may not answer on every node yet (no responders): the store says
            # UNAVAILABLE and callers retry; creates are write-once and enqueues deduplicated by id
            for i in range(20):
                await store.create(OUT, f"batch-2.{i}", b"x")
                await store.enqueue("work.normal.m", str(i).encode(), msg_id=f"m{i}")

        await retry(before_loss, attempts=40, delay=0.25)
        cluster.kill(0)

        async def after_loss() -> int:
            for i in range(20, 30):
                await store.create(OUT, f"batch-2.{i}", b"x")
            return await store.count(f"KV_{OUT}", f"$KV.{OUT}.batch-2.*")

        assert await retry(after_loss, attempts=60, delay=0.25) == 30
        sub = await retry(lambda: store.consumer("w-normal-m", "work.normal.m"), attempts=40, delay=0.25)
        got: list[bytes] = []
        deadline = asyncio.get_running_loop().time() + 30
        while len(got) < 20 and asyncio.get_running_loop().time() < deadline:
            try:
                msgs = await sub.fetch(20 - len(got), timeout=2)
            except nats.errors.TimeoutError:
                continue
            for msg in msgs:
                got.append(msg.data)
                await msg.ack()
        assert sorted(int(d) for d in got) == list(range(20))
        info = await retry(lambda: store.js.stream_info(WORK), attempts=40, delay=0.25)
        assert info.config.num_replicas == 3
    finally:
        await store.close()
