"""A job worker: takes jobs and batch lines from JetStream while the mesh has spare capacity.

Per model a feeder waits until the model's replicas have room (capacity.py), then fetches the
next message, HIGH band before NORMAL before LOW, and hands it to a task. Delivery is
at-least-once; the effect is exactly once:
- a job is claimed by a compare-and-set of its record (QUEUED or RUNNING -> RUNNING with this
  worker's id) and finished by another compare-and-set from the revision it claimed: a worker
  that lost the job (cancelled, or taken over after its ack wait ran out) cannot overwrite it;
- a batch line's outcome is created only if absent (lines.py).
While a generation runs the worker extends the message's ack wait and re-reads the job every
`heartbeat_s`; a cancel signal stops it at once, the re-read within a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

from meshserve.v1 import jobs_pb2
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.router.dispatch import Dispatcher
from services.router.pool import BackendPool
from services.router.replica import Replica

from . import metrics
from . import records as r
from .capacity import free_slots
from .execute import Executor, Failure
from .jobs_api import decode_job, job_key
from .store import CANCEL_SUBJECT, JOBS, JobStore, NothingFetched, StoreErrors, work_subject

log = logging.getLogger(__name__)


@dataclass
class WorkerSettings:
    worker_id: str
    #: Background work fills a replica up to this share of its running capacity.
    fill: float = 0.5
    #: Generations in flight in this worker at most.
    max_in_flight: int = 64
    heartbeat_s: float = 1.0


class Running:
    """Tasks in flight, by job id and by batch id, so a cancel signal finds them."""

    def __init__(self) -> None:
        self.tasks: dict[str, set[asyncio.Task]] = {}
        #: Tasks stopped because their work was cancelled or taken over (not a shutdown).
        self.dropped: set[asyncio.Task] = set()

    def add(self, key: str, task: asyncio.Task) -> None:
        self.tasks.setdefault(key, set()).add(task)
        task.add_done_callback(lambda t: self._discard(key, t))

    def _discard(self, key: str, task: asyncio.Task) -> None:
        found = self.tasks.get(key)
        if found is not None:
            found.discard(task)
            if not found:
                del self.tasks[key]
        self.dropped.discard(task)

    def drop(self, task: asyncio.Task) -> None:
        self.dropped.add(task)
        task.cancel()

    def cancel(self, key: str) -> int:
        tasks = list(self.tasks.get(key, ()))
        for task in tasks:
            self.drop(task)
        return len(tasks)


class JobWorker:
    def __init__(self, store: JobStore, pool: BackendPool, executor: Executor, settings: WorkerSettings,
                 line_runner: Callable[[JobWorker, jobs_pb2.WorkItem, Msg], object] | None = None,
                 dispatcher: Dispatcher | None = None) -> None:
        self.store = store
        self.pool = pool
        self._dispatcher = dispatcher
        self.executor = executor
        self.settings = settings
        self.running = Running()
        self.in_flight = 0
        self._starting: dict[str, int] = {}
        self._feeders: dict[str, asyncio.Task] = {}
        self._handlers: set[asyncio.Task] = set()
        self._line_runner = line_runner
        #: Job workers alive (from etcd): each takes its share of the free slots, so workers whose
        #: views of the load lag one another cannot together overfill a replica.
        self.peers = 1
        self._room = asyncio.Event()
        pool.on_change(self._room.set)

    # --- feeding ------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        assert self.store.nc is not None
        sub = await self.store.nc.subscribe(CANCEL_SUBJECT, cb=self._on_cancel)
        try:
            while not stop.is_set():
                self._sync_feeders()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
        finally:
            await sub.unsubscribe()
            for task in [*self._feeders.values(), *self._handlers]:
                task.cancel()  # work in flight goes back to the queue at once (negative ack)
            if self._handlers:
                await asyncio.wait(self._handlers, timeout=5.0)

    def known_models(self) -> frozenset[str]:
        """Deployments, plus the names traffic policies answer to (a job may name an alias)."""
        return self._dispatcher.known_models() if self._dispatcher is not None else self.pool.known_models()

    def replicas(self, name: str) -> list[Replica]:
        """The replicas a request for `name` may reach (an alias reaches its deployments')."""
        traffic = self._dispatcher.traffic if self._dispatcher is not None else None
        if traffic is not None and traffic.handles(name):
            return [r for m in sorted(traffic.deployments(name)) for r in self.pool.candidates(m)]
        return self.pool.candidates(name)

    def _sync_feeders(self) -> None:
        models = self.known_models()
        for model in models - self._feeders.keys():
            self._feeders[model] = asyncio.get_running_loop().create_task(self._feed(model), name=f"feed:{model}")
        for model in set(self._feeders) - models:
            self._feeders.pop(model).cancel()

    def has_room(self, model: str) -> bool:
        if self.in_flight >= self.settings.max_in_flight:
            return False
        slots = free_slots(self.replicas(model), self.settings.fill)
        return math.ceil(slots / max(1, self.peers)) - self._starting.get(model, 0) > 0

    async def _wait_room(self, model: str) -> None:
        while not self.has_room(model):
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), 0.25)

    async def _feed(self, model: str) -> None:
        token = r.model_token(model)
        subs: dict[str, JetStreamContext.PullSubscription] = {}
        while True:
            try:
                for band in r.BAND_ORDER:
                    if band not in subs:
                        subs[band] = await self.store.consumer(f"w-{band}-{token}", work_subject(band, token))
                await self._wait_room(model)
                msg = await self._next(subs)
            except asyncio.CancelledError:
                raise
            except StoreErrors as exc:
                log.warning("fetching work for %s: %s; retrying", model, exc)
                await asyncio.sleep(1.0)
                continue
            if msg is not None:
                self._start(model, msg)

    async def _next(self, subs: dict[str, JetStreamContext.PullSubscription]) -> Msg | None:
        for i, band in enumerate(r.BAND_ORDER):
            last = i == len(r.BAND_ORDER) - 1
            try:
                msgs = await subs[band].fetch(1, timeout=0.5 if last else 0.05)
            except NothingFetched:
                continue
            if msgs:
                return msgs[0]
        return None

    def _start(self, model: str, msg: Msg) -> None:
        self.in_flight += 1
        metrics.IN_FLIGHT.inc()
        self._starting[model] = self._starting.get(model, 0) + 1
        started = False

        def on_started() -> None:
            nonlocal started
            if not started:
                started = True
                self._starting[model] -= 1

        async def handle() -> None:
            try:
                await self._handle(msg, on_started)
            except asyncio.CancelledError:
                pass
            except StoreErrors as exc:
                log.warning("job store error while handling a work item (it is redelivered): %s", exc)
            except Exception:
                log.exception("work item failed unexpectedly (it is redelivered)")
            finally:
                on_started()
                self.in_flight -= 1
                metrics.IN_FLIGHT.dec()
                self._room.set()

        task = asyncio.get_running_loop().create_task(handle(), name=f"work:{model}")
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _handle(self, msg: Msg, started: Callable[[], None]) -> None:
        try:
            item = jobs_pb2.WorkItem.FromString(msg.data)
        except Exception:  # noqa: BLE001 - a message no version of us wrote: drop it, loudly
            log.error("dropping an unreadable work item (%d bytes)", len(msg.data))
            await msg.term()
            return
        if item.batch_id:
            if self._line_runner is not None:
                await self._line_runner(self, item, msg)  # type: ignore[misc]
            return
        await self.run_job(item, msg, started)

    # --- jobs ---------------------------------------------------------------------------------

    async def run_job(self, item: jobs_pb2.WorkItem, msg: Msg, started: Callable[[], None]) -> None:
        claimed = await self._claim(item.job_id, msg.metadata.num_delivered)
        if claimed is None:
            await msg.ack()
            return
        record, revision = claimed
        task = asyncio.current_task()
        assert task is not None
        self.running.add(item.job_id, task)
        watch = asyncio.get_running_loop().create_task(self._heartbeat(item.job_id, revision, msg, task))
        try:
            response = await self.executor.generate(item.request, item.job_id, item.deadline_ms,
                                                    msg.in_progress, started=started)
        except Failure as exc:
            await self._fail_or_retry(record, revision, msg, exc)
            return
        except asyncio.CancelledError:
            await self.release(msg, task)
            raise
        finally:
            watch.cancel()
        await self._finish(record, revision, jobs_pb2.JOB_STATE_SUCCEEDED, response=response)
        await msg.ack()

    async def _claim(self, job_id: str, delivery: int) -> tuple[jobs_pb2.JobRecord, int] | None:
        """RUNNING for this worker (fenced on the revision read), or None when there is nothing to do."""
        while True:
            found = await self.store.get(JOBS, job_key(job_id))
            if found is None:
                return None  # deleted after its retention, or never stored
            record = decode_job(*found)
            job = record.job
            if job.state in r.JOB_FINAL:
                return None
            if r.now_ms() > job.deadline_ms:
                await self._finish(record, job.revision, jobs_pb2.JOB_STATE_EXPIRED, code="EXPIRED",
                                   message="the completion window passed before a worker could run it")
                return None
            job.state, job.worker_id, job.attempts = jobs_pb2.JOB_STATE_RUNNING, self.settings.worker_id, delivery
            job.started_at_ms = job.started_at_ms or r.now_ms()
            revision = await self.store.cas(JOBS, job_key(job_id), record.SerializeToString(), job.revision)
            if revision is not None:
                return record, revision

    async def _heartbeat(self, job_id: str, revision: int, msg: Msg, task: asyncio.Task) -> None:
        """Keep the message ours and stop the generation once the record moved on without us."""
        while True:
            await asyncio.sleep(self.settings.heartbeat_s)
            with contextlib.suppress(*StoreErrors):
                await msg.in_progress()
                found = await self.store.get(JOBS, job_key(job_id))
                if found is None or found[1] != revision:
                    log.info("job %s changed under this worker (cancelled or taken over): stopping it", job_id)
                    self.running.drop(task)
                    return

    async def _fail_or_retry(self, record: jobs_pb2.JobRecord, revision: int, msg: Msg, exc: Failure) -> None:
        if exc.code == "DEADLINE_EXCEEDED":
            await self._finish(record, revision, jobs_pb2.JOB_STATE_EXPIRED, code="EXPIRED", message=exc.message)
        elif exc.final or msg.metadata.num_delivered >= self.store.settings.max_deliver:
            await self._finish(record, revision, jobs_pb2.JOB_STATE_FAILED, code=exc.code,
                               message=f"{exc.message} (delivery {msg.metadata.num_delivered})")
        else:
            log.info("job %s failed (%s: %s); it is delivered again", record.job.job_id, exc.code, exc.message)
            await msg.nak(delay=min(30.0, 2.0 ** msg.metadata.num_delivered))
            return
        await msg.ack()

    async def _finish(self, record: jobs_pb2.JobRecord, revision: int, state: jobs_pb2.JobState,
                      code: str = "",
                      message: str = "", response=None) -> bool:
        """The one write of a final state, from the revision this worker holds; False = fenced off."""
        job = record.job
        job.state, job.finished_at_ms, job.error_code, job.error_message = state, r.now_ms(), code, message
        job.worker_id = self.settings.worker_id
        if response is not None:
            record.response.CopyFrom(response)
        written = await self.store.cas(JOBS, job_key(job.job_id), record.SerializeToString(), revision,
                                       ttl_s=job.retention_s)
        if written is None:
            metrics.FENCED.inc()
            log.info("job %s: result not written, another writer holds it now (fenced)", job.job_id)
            return False
        metrics.JOBS.labels(r.state_name(state)).inc()
        return True

    async def release(self, msg: Msg, task: asyncio.Task) -> None:
        """A stopped generation: done here when its work was cancelled or taken over; on shutdown
        the message goes back at once so another worker runs it."""
        with contextlib.suppress(*StoreErrors):
            if task in self.running.dropped:
                await msg.ack()
            else:
                await msg.nak()

    async def _on_cancel(self, msg: Msg) -> None:
        key = msg.data.decode(errors="replace")
        if self.running.cancel(key):
            log.info("cancel signal: stopped %s", key)

