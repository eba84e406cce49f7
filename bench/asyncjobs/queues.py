"""Jobs per second the queue sustains: the JetStream design against an etcd-only queue, both on a
3-member cluster on loopback, with the same protocol and no generation (the store is the point).

Per job: submit = create the record only if absent + enqueue; a worker = take the next job, claim
it (compare-and-set on the record's revision: RUNNING), finish it (compare-and-set: SUCCEEDED).
JetStream: work-queue stream with a durable pull consumer and explicit ack, KV records
(services/jobs/store.py, the code the workers run). etcd: records and queue keys under two
prefixes; a worker ranges over the queue (limit 16, a random pick to spread contention) and claims
in one transaction (queue key still there -> delete it, record RUNNING).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import aetcd.exceptions
import aetcd.rpc as rpc
import grpc

from services.common.etcd_client import EtcdClient
from services.common.etcd_txn import absent, delete_op, present, put_op, txn, unchanged
from services.jobs.store import JOBS, JobStore, NothingFetched, StoreErrors, StoreSettings
from tests.helpers import EtcdCluster
from tests.jobs_helpers import JetStreamCluster

from .common import loadavg, progress

T = TypeVar("T")


async def _again(call: Callable[[], Awaitable[T]], errors: list[str], kinds: tuple = StoreErrors) -> T:
    """A store call retried through transient errors (a loaded machine makes JetStream's API
    answer 503 or time out now and then); each error is counted in the result."""
    for _ in range(50):
        try:
            return await call()
        except kinds as exc:
            errors.append(type(exc).__name__)
            await asyncio.sleep(0.1)
    return await call()


async def _jetstream(urls: tuple[str, ...], jobs: int, workers: int) -> dict:
    store = JobStore(StoreSettings(servers=urls, replicas=3))
    await store.connect("bench-queue")
    subject = "work.normal.benchqueue"
    done = 0
    errors: list[str] = []
    t0 = time.perf_counter()

    async def submit(i: int) -> None:
        await _again(partial(store.create, JOBS, f"job.b{i}", b"QUEUED"), errors)
        await _again(partial(store.enqueue, subject, str(i).encode(), msg_id=f"b{i}"), errors)

    async def submitter(k: int) -> None:
        for i in range(k, jobs, workers):
            await submit(i)

    async def worker() -> None:
        nonlocal done
        sub = await _again(partial(store.consumer, "bench-queue", subject), errors)
        while done < jobs:
            try:
                msgs = await sub.fetch(1, timeout=0.5)
            except NothingFetched:
                continue  # nothing to fetch right now
            except StoreErrors as exc:
                errors.append(type(exc).__name__)
                continue
            key = f"job.b{msgs[0].data.decode()}"
            found = await _again(partial(store.get, JOBS, key), errors)
            if found is not None and found[0] == b"QUEUED":
                rev = await _again(partial(store.cas, JOBS, key, b"RUNNING", found[1]), errors)
                if rev is not None and await _again(partial(store.cas, JOBS, key, b"SUCCEEDED", rev),
                                                    errors) is not None:
                    done += 1
            await msgs[0].ack()

    await asyncio.gather(*(submitter(k) for k in range(workers)), *(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - t0
    await store.close()
    return {"jobs": jobs, "seconds": round(elapsed, 2), "jobs_per_s": round(jobs / elapsed, 1),
            "transient_errors": len(errors), "transient_error_kinds": dict(Counter(errors))}


async def _etcd(endpoints: str, jobs: int, workers: int) -> dict:
    client = EtcdClient(endpoints, timeout=10)
    await client.connect()
    errors: list[str] = []
    kinds = (aetcd.exceptions.ClientError, asyncio.TimeoutError, grpc.aio.AioRpcError)
    done = 0
    rng = random.Random(1)
    t0 = time.perf_counter()

    async def submitter(k: int) -> None:
        for i in range(k, jobs, workers):
            record, queued = f"/bench/jobs/b{i}", f"/bench/queue/b{i}"
            await _again(partial(txn, client, [absent(client, record)],
                                 [put_op(record, b"QUEUED"), put_op(queued, b"")]), errors, kinds)

    async def next_keys() -> list[str]:
        raw = client.raw
        prefix = b"/bench/queue/"
        resp = await raw.kvstub.Range(rpc.RangeRequest(key=prefix, range_end=b"/bench/queue0", limit=16,
                                                       keys_only=True), timeout=10, metadata=raw.metadata)
        return [kv.key.decode() for kv in resp.kvs]

    async def worker() -> None:
        nonlocal done
        while done < jobs:
            keys = await _again(next_keys, errors, kinds)
            if not keys:
                await asyncio.sleep(0.01)
                continue
            queued = rng.choice(keys)
            record = "/bench/jobs/" + queued.rsplit("/", 1)[1]
            claim = await _again(partial(txn, client, [present(client, queued)],
                                         [delete_op(queued), put_op(record, b"RUNNING")]), errors, kinds)
            if not claim.succeeded:
                continue  # another worker took it
            if (await _again(partial(txn, client, [unchanged(client, record, claim.revision)],
                                     [put_op(record, b"SUCCEEDED")]), errors, kinds)).succeeded:
                done += 1

    await client.raw.connect()
    await asyncio.gather(*(submitter(k) for k in range(workers)), *(worker() for _ in range(workers)))
    elapsed = time.perf_counter() - t0
    await client.close()
    return {"jobs": jobs, "seconds": round(elapsed, 2), "jobs_per_s": round(jobs / elapsed, 1),
            "transient_errors": len(errors), "transient_error_kinds": dict(Counter(errors))}


def run(root: Path, jobs: int, workers: int) -> dict:
    out: dict[str, dict] = {}
    js = JetStreamCluster(root / "js", nodes=3)
    js.start()
    try:
        progress(f"queue: JetStream, {jobs} jobs, {workers} submitters + {workers} workers ...")
        out["jetstream"] = {"loadavg_start": loadavg(), **asyncio.run(_jetstream(js.urls, jobs, workers))}
    finally:
        js.stop()
    etcd = EtcdCluster(root / "etcd", members=3)
    etcd.start()
    try:
        progress(f"queue: etcd, {jobs} jobs ...")
        out["etcd"] = {"loadavg_start": loadavg(), **asyncio.run(_etcd(etcd.endpoints, jobs, workers))}
    finally:
        etcd.stop()
    progress(f"queue: {out}")
    return out
