"""The batch lifecycle in workers: plan (validating), watch progress, finalize, expire, delete.

Every worker runs these loops; compare-and-set on the batch record decides which one acts, so
any of them may die at any point and another carries on:
- plan: the planning message (one per batch, work queue) is expanded into one work item per
  valid line (deduplicated by message id) and an error outcome per bad line; then IN_PROGRESS.
  A planner that dies is replaced by the message's redelivery, which plans again (outcomes and
  message ids make that harmless).
- monitor (each second): counts outcomes (exact, on the server); when every line has one, or
  the batch was cancelled (after CANCEL_GRACE_S) or expired, claims FINALIZING, writes the output
  and error files and the final status. A finalizer silent for FINALIZE_TIMEOUT_S is replaced.
- dead letters: JetStream's max-deliveries advisories become failed jobs and failed lines.
- sweep (each minute): batches past their retention lose their files, outcomes and record; jobs
  whose window passed while queued (their message was never published) expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
from collections.abc import Callable

import nats.errors
import nats.js.errors
from meshserve.v1 import jobs_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from . import jsonl, metrics
from . import records as r
from .batches_api import BatchApi, batch_key, decode_batch, file_key, line_counts
from .jobs_api import decode_job, job_key
from .lines import BatchCache, line_failed, out_key, write_outcome
from .store import DEAD, JOBS, OUT, PLAN_SUBJECT, WORK, JobStore, NothingFetched, StoreErrors, work_subject

log = logging.getLogger(__name__)

CANCEL_GRACE_S = 3.0
FINALIZE_TIMEOUT_S = 60.0
SWEEP_EVERY_S = 60.0
PUBLISH_WINDOW = 256


class BatchKeeper:
    def __init__(self, store: JobStore, known_models: Callable[[], frozenset[str]], cache: BatchCache,
                 worker_id: str, may_call: Callable[[str, str], bool] | None = None) -> None:
        """`may_call(tenant, model)`: the tenants' model grants, checked for a tenant's batch lines
        (None: nothing to check, as in a mesh without authentication)."""
        self.store = store
        self.known_models = known_models
        self.may_call = may_call
        self.cache = cache
        self.worker_id = worker_id
        self.files = BatchApi(store)
        self._subs: dict[str, JetStreamContext.PullSubscription] = {}

    async def _sub(self, name: str, subject: str, stream: str = WORK) -> JetStreamContext.PullSubscription:
        if name not in self._subs:
            self._subs[name] = await self.store.consumer(name, subject, stream)
        return self._subs[name]

    async def run(self, stop: asyncio.Event) -> None:
        loops = [self._loop(self._plan_next, stop), self._loop(self._dead_next, stop),
                 self._loop(self._monitor, stop, 1.0), self._loop(self._sweep, stop, SWEEP_EVERY_S)]
        await asyncio.gather(*loops)

    async def _loop(self, step, stop: asyncio.Event, every_s: float = 0.0) -> None:
        while not stop.is_set():
            try:
                await step()
            except StoreErrors as exc:
                log.warning("%s: job store error %s; retrying", step.__name__, exc)
                every = max(every_s, 1.0)
            except Exception:
                log.exception("%s failed; retrying", step.__name__)
                every = max(every_s, 1.0)
            else:
                every = every_s
            if every:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), every)

    # --- planning -----------------------------------------------------------------------------

    async def _plan_next(self) -> None:
        sub = await self._sub("planner", PLAN_SUBJECT)
        try:
            msgs = await sub.fetch(1, timeout=1.0)
        except NothingFetched:
            return
        await self.plan(msgs[0])

    async def plan(self, msg: Msg) -> None:
        batch_id = msg.data.decode(errors="replace")
        found = await self.store.get(JOBS, batch_key(batch_id))
        if found is None or decode_batch(*found).status != jobs_pb2.BATCH_STATUS_VALIDATING:
            await msg.ack()
            return
        batch = decode_batch(*found)
        try:
            total = await self._expand(batch, msg)
        except StoreErrors:
            raise
        except Exception as exc:
            log.exception("batch %s: its input could not be planned", batch_id)
            await self._set_status(batch, jobs_pb2.BATCH_STATUS_FAILED,
                                   error=f"the input file could not be read: {exc}")
            await msg.ack()
            return
        batch.status, batch.in_progress_at_ms = jobs_pb2.BATCH_STATUS_IN_PROGRESS, r.now_ms()
        batch.request_counts.total = total
        await self.store.cas(JOBS, batch_key(batch_id), batch.SerializeToString(), batch.revision)
        await msg.ack()

    async def _expand(self, batch: jobs_pb2.Batch, msg: Msg) -> int:
        """Publish a work item per valid line; outcome errors for the rest. Returns the line count."""
        subject = work_subject(r.band(batch.priority), "")
        seen: set[str] = set()
        total, pending = 0, []
        with tempfile.TemporaryFile() as spool:
            await self.store.files.get(batch.input_file_id, writeinto=spool)
            spool.seek(0)
            for index, raw in enumerate(spool):
                if not raw.strip():
                    continue
                total += 1
                line = jsonl.parse_line(index, raw, self.known_models)
                if line.request is not None and line.custom_id in seen:
                    line = jsonl.Line(index, line.custom_id, None, "duplicate_custom_id",
                                      f"line {index + 1}: custom_id {line.custom_id[:64]!r} appears earlier too")
                seen.add(line.custom_id)
                line = self._as_owner(batch, line)
                if line.request is None:
                    await write_outcome(self.store, batch.batch_id, line_failed(
                        line.custom_id, index, line.error_code, line.error_message, self.worker_id))
                    continue
                item = jobs_pb2.WorkItem(batch_id=batch.batch_id, line=index, custom_id=line.custom_id,
                                         request=line.request, deadline_ms=batch.expires_at_ms)
                pending.append(self.store.enqueue(subject + r.model_token(line.request.model),
                                                  item.SerializeToString(), msg_id=f"{batch.batch_id}.{index}"))
                if len(pending) >= PUBLISH_WINDOW:
                    await asyncio.gather(*pending)
                    pending = []
                    await msg.in_progress()
            await asyncio.gather(*pending)
        return total

    def _as_owner(self, batch: jobs_pb2.Batch, line: jsonl.Line) -> jsonl.Line:
        """A tenant's line runs as that tenant: a model it was not granted fails the line, and the
        request's tenant (cache partition) is the batch owner's whatever the line named."""
        if line.request is None or not batch.tenant:
            return line
        if self.may_call is not None and not self.may_call(batch.tenant, line.request.model):
            return jsonl.Line(line.index, line.custom_id, None, "PERMISSION_DENIED",
                              f"line {line.index + 1}: tenant {batch.tenant} may not call model "
                              f"{line.request.model!r}; an operator grants models per tenant")
        line.request.tenant = batch.tenant
        return line

    # --- progress, finalizing, expiry ---------------------------------------------------------

    async def _monitor(self) -> None:
        fresh = {}
        async for _, value, rev in self.store.scan(JOBS, "batch."):
            batch = decode_batch(value, rev)
            fresh[batch.batch_id] = batch
        self.cache.batches = fresh
        for batch in fresh.values():
            if batch.status not in r.BATCH_FINAL:
                await self._advance(batch)

    async def _advance(self, batch: jobs_pb2.Batch) -> None:
        now = r.now_ms()
        status = batch.status
        if status == jobs_pb2.BATCH_STATUS_IN_PROGRESS:
            done, _ = await line_counts(self.store, batch.batch_id)
            if done >= batch.request_counts.total:
                await self.finalize(batch, jobs_pb2.BATCH_STATUS_COMPLETED)
            elif now > batch.expires_at_ms:
                await self.finalize(batch, jobs_pb2.BATCH_STATUS_EXPIRED)
        elif status == jobs_pb2.BATCH_STATUS_CANCELLING and now - batch.cancelling_at_ms > CANCEL_GRACE_S * 1000:
            await self.finalize(batch, jobs_pb2.BATCH_STATUS_CANCELLED)
        elif status == jobs_pb2.BATCH_STATUS_VALIDATING and now > batch.expires_at_ms:
            await self._set_status(batch, jobs_pb2.BATCH_STATUS_EXPIRED, error="expired before it was validated")
        elif status == jobs_pb2.BATCH_STATUS_FINALIZING and now - batch.finalizing_at_ms > FINALIZE_TIMEOUT_S * 1000:
            await self.finalize(batch, jobs_pb2.BATCH_STATUS_COMPLETED)

    async def finalize(self, batch: jobs_pb2.Batch, final: jobs_pb2.BatchStatus) -> None:
        """Claim the batch (FINALIZING, fenced), write its output and error files, then `final`."""
        if final == jobs_pb2.BATCH_STATUS_COMPLETED:
            batch.status = jobs_pb2.BATCH_STATUS_FINALIZING
        batch.finalizing_at_ms = r.now_ms()
        revision = await self.store.cas(JOBS, batch_key(batch.batch_id), batch.SerializeToString(), batch.revision)
        if revision is None:
            return  # another worker finalizes it
        batch.revision = revision
        ok, failed = 0, 0
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            async for msg in self.store.read_subject(f"KV_{OUT}", f"$KV.{OUT}.{batch.batch_id}.*"):
                outcome = jobs_pb2.LineOutcome.FromString(msg.data)
                target = err if outcome.error_code else out
                target.write(jsonl.output_line(batch.batch_id, outcome))
                failed += bool(outcome.error_code)
                ok += not outcome.error_code
            missing = batch.request_counts.total - ok - failed
            name = batch.batch_id
            for spool, purpose, lines, field in ((out, "batch_output", ok, "output_file_id"),
                                                 (err, "batch_error", failed, "error_file_id")):
                if lines:
                    size = spool.tell()
                    spool.seek(0)
                    stored = await self.files.store_file(spool, f"{name}_{purpose}.jsonl", purpose, size, lines,
                                                         batch.tenant)
                    setattr(batch, field, stored.file_id)
        batch.request_counts.completed = ok
        batch.request_counts.failed = failed + (missing if final != jobs_pb2.BATCH_STATUS_CANCELLED else 0)
        await self._set_status(batch, final)
        log.info("batch %s %s: %d completed, %d failed, %d not run", name, r.batch_status_name(final), ok,
                 failed, missing)

    async def _set_status(self, batch: jobs_pb2.Batch, status: jobs_pb2.BatchStatus,
                          error: str = "") -> bool:
        batch.status, batch.error_message = status, error or batch.error_message
        stamp: dict[int, str] = {
            jobs_pb2.BATCH_STATUS_COMPLETED: "completed_at_ms", jobs_pb2.BATCH_STATUS_FAILED: "failed_at_ms",
            jobs_pb2.BATCH_STATUS_EXPIRED: "expired_at_ms", jobs_pb2.BATCH_STATUS_CANCELLED: "cancelled_at_ms"}
        if status in stamp:
            setattr(batch, stamp[status], r.now_ms())
        written = await self.store.cas(JOBS, batch_key(batch.batch_id), batch.SerializeToString(), batch.revision)
        return written is not None

    # --- dead letters ---------------------------------------------------------------------------

    async def _dead_next(self) -> None:
        sub = await self._sub("dead-letters", "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>", DEAD)
        try:
            msgs = await sub.fetch(1, timeout=1.0)
        except NothingFetched:
            return
        advisory = json.loads(msgs[0].data)
        seq, deliveries = int(advisory.get("stream_seq", 0)), advisory.get("deliveries", 0)
        try:
            raw = await self.store.js.get_msg(WORK, seq)
        except nats.js.errors.NotFoundError:
            await msgs[0].ack()  # acknowledged after all (a late ack raced the advisory)
            return
        if raw.subject == PLAN_SUBJECT:
            await self._dead_plan((raw.data or b"").decode(errors="replace"), deliveries)
        elif raw.data is not None:
            await self._dead(jobs_pb2.WorkItem.FromString(raw.data), deliveries)
        await self.store.js.delete_msg(WORK, seq)
        await msgs[0].ack()

    async def _dead_plan(self, batch_id: str, deliveries: int) -> None:
        found = await self.store.get(JOBS, batch_key(batch_id)) if batch_id.startswith("batch-") else None
        if found is not None and decode_batch(*found).status == jobs_pb2.BATCH_STATUS_VALIDATING:
            await self._set_status(decode_batch(*found), jobs_pb2.BATCH_STATUS_FAILED,
                                   error=f"validating was tried {deliveries} times and never finished")

    async def _dead(self, item: jobs_pb2.WorkItem, deliveries: int) -> None:
        why = f"delivered {deliveries} times without finishing (workers died or timed out running it)"
        log.warning("dead letter: %s %s", item.job_id or f"{item.batch_id} line {item.line}", why)
        metrics.DEAD_LETTERS.inc()
        if item.batch_id:
            await write_outcome(self.store, item.batch_id, line_failed(item.custom_id, item.line, "max_deliveries",
                                                                       why, self.worker_id))
            return
        while True:
            found = await self.store.get(JOBS, job_key(item.job_id))
            if found is None or decode_job(*found).job.state in r.JOB_FINAL:
                return
            record = decode_job(*found)
            job = record.job
            job.state, job.finished_at_ms = jobs_pb2.JOB_STATE_FAILED, r.now_ms()
            job.error_code, job.error_message = "MAX_DELIVERIES", why
            if await self.store.cas(JOBS, job_key(item.job_id), record.SerializeToString(), job.revision,
                                    ttl_s=job.retention_s) is not None:
                return

    # --- retention ----------------------------------------------------------------------------

    async def _sweep(self) -> None:
        now = r.now_ms()
        for batch in list(self.cache.batches.values()):
            ended = max(batch.completed_at_ms, batch.failed_at_ms, batch.expired_at_ms, batch.cancelled_at_ms)
            if batch.status in r.BATCH_FINAL and ended and now > ended + 1000 * batch.retention_s:
                await self.delete_batch(batch)
        async for _, value, rev in self.store.scan(JOBS, "job."):
            record = decode_job(value, rev)
            job = record.job
            if job.state == jobs_pb2.JOB_STATE_QUEUED and now > job.deadline_ms + 60_000:
                job.state, job.finished_at_ms = jobs_pb2.JOB_STATE_EXPIRED, now
                job.error_code, job.error_message = "EXPIRED", "the completion window passed while it was queued"
                await self.store.cas(JOBS, job_key(job.job_id), record.SerializeToString(), rev, ttl_s=job.retention_s)

    async def delete_batch(self, batch: jobs_pb2.Batch) -> None:
        for file_id in (batch.output_file_id, batch.error_file_id, batch.input_file_id):
            if file_id:
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await self.store.files.delete(file_id)
                await self.store.delete(JOBS, file_key(file_id))
        await self.store.js.purge_stream(f"KV_{OUT}", subject=f"$KV.{OUT}.{batch.batch_id}.>")
        await self.store.delete(JOBS, batch_key(batch.batch_id))
        self.cache.batches.pop(batch.batch_id, None)
        log.info("batch %s deleted after its retention (%d s)", batch.batch_id, batch.retention_s)


__all__ = ["BatchKeeper", "out_key"]
