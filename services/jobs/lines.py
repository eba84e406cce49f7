"""One batch line in a worker: run it once, and write its outcome exactly once.

The outcome goes to `MS_OUT` under `<batch>.<line>` with create-only-if-absent, which is the
fence for lines: a redelivered line whose outcome exists is acknowledged and skipped, and a
second worker that ran the same line concurrently cannot write a second result (counted as a
suppressed duplicate). A failed line also gets an `<batch>.e.<line>` marker, created after its
outcome and again on any redelivery, so failures are counted exactly by the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from meshserve.v1 import jobs_pb2
from nats.aio.msg import Msg

from . import metrics
from . import records as r
from .batches_api import batch_key, decode_batch
from .execute import Failure
from .store import JOBS, OUT, JobStore, StoreErrors
from .worker import JobWorker

log = logging.getLogger(__name__)

STOPPED = frozenset({jobs_pb2.BATCH_STATUS_CANCELLING, jobs_pb2.BATCH_STATUS_CANCELLED,
                     jobs_pb2.BATCH_STATUS_EXPIRED, jobs_pb2.BATCH_STATUS_FAILED})


def out_key(batch_id: str, line: int) -> str:
    return f"{batch_id}.{line}"


def error_key(batch_id: str, line: int) -> str:
    return f"{batch_id}.e.{line}"


async def write_outcome(store: JobStore, batch_id: str, outcome: jobs_pb2.LineOutcome) -> bool:
    """True when this call wrote the line's outcome; False when it already had one."""
    written = await store.create(OUT, out_key(batch_id, outcome.line), outcome.SerializeToString())
    if outcome.error_code:
        await store.create(OUT, error_key(batch_id, outcome.line), b"")
    return written is not None


class BatchCache:
    """Batch records as last read (the monitor refreshes them every second)."""

    def __init__(self, store: JobStore) -> None:
        self._store = store
        self.batches: dict[str, jobs_pb2.Batch] = {}

    async def get(self, batch_id: str) -> jobs_pb2.Batch | None:
        batch = self.batches.get(batch_id)
        if batch is None:
            found = await self._store.get(JOBS, batch_key(batch_id))
            if found is None:
                return None
            batch = self.batches[batch_id] = decode_batch(*found)
        return batch


class LineRunner:
    def __init__(self, cache: BatchCache) -> None:
        self.cache = cache
        self.duplicates_suppressed = 0

    async def __call__(self, worker: JobWorker, item: jobs_pb2.WorkItem, msg: Msg) -> None:
        store = worker.store
        batch = await self.cache.get(item.batch_id)
        if batch is None or batch.status in STOPPED:
            await msg.ack()  # deleted, cancelled or over: nothing more to run for it
            return
        existing = await store.get(OUT, out_key(item.batch_id, item.line))
        if existing is not None:
            if jobs_pb2.LineOutcome.FromString(existing[0]).error_code:
                await store.create(OUT, error_key(item.batch_id, item.line), b"")
            await msg.ack()
            return
        outcome = jobs_pb2.LineOutcome(custom_id=item.custom_id, line=item.line,
                                       worker_id=worker.settings.worker_id)
        task = asyncio.current_task()
        assert task is not None
        worker.running.add(item.batch_id, task)
        keepalive = asyncio.get_running_loop().create_task(_keep(msg, store.settings.ack_wait_s / 3))
        try:
            outcome.response.CopyFrom(await worker.executor.generate(
                item.request, f"{item.batch_id}-{item.line}", batch.expires_at_ms, msg.in_progress,
                share_prefix=True))
        except Failure as exc:
            if not (exc.final or exc.code == "DEADLINE_EXCEEDED"
                    or msg.metadata.num_delivered >= store.settings.max_deliver):
                await msg.nak(delay=min(30.0, 2.0 ** msg.metadata.num_delivered))
                return
            outcome.error_code = "batch_expired" if exc.code == "DEADLINE_EXCEEDED" else exc.code
            outcome.error_message = exc.message
        except asyncio.CancelledError:
            await worker.release(msg, task)
            raise
        finally:
            keepalive.cancel()
        written = await write_outcome(store, item.batch_id, outcome)
        metrics.LINES.labels("duplicate" if not written else "error" if outcome.error_code else "ok").inc()
        if not written:
            self.duplicates_suppressed += 1
            log.info("line %s of %s already had an outcome; this run's is dropped", item.line, item.batch_id)
        await msg.ack()


async def _keep(msg: Msg, every_s: float) -> None:
    """Extend the message's ack wait while its generation runs."""
    while True:
        await asyncio.sleep(every_s)
        with contextlib.suppress(*StoreErrors):
            await msg.in_progress()


def line_failed(custom_id: str, line: int, code: str, message: str, worker_id: str = "") -> jobs_pb2.LineOutcome:
    return jobs_pb2.LineOutcome(custom_id=custom_id, line=line, error_code=code, error_message=message,
                                worker_id=worker_id)


def is_final(batch: jobs_pb2.Batch) -> bool:
    return batch.status in r.BATCH_FINAL
