"""The job half of JobService as plain Python: submit, get, list, cancel, watch, result.

Records live in JetStream (store.py); every state change is a compare-and-set on the record's
revision, so concurrent writers (two API replicas, a worker, a canceller) never overwrite each
other: the loser re-reads and decides again.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable

import nats.errors
from meshserve.v1 import jobs_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound
from services.common.validation import validate_request

from . import records as r
from .store import CANCEL_SUBJECT, JOBS, JobStore, work_subject

log = logging.getLogger(__name__)


def job_key(job_id: str) -> str:
    return f"job.{job_id}"


def decode_job(value: bytes, revision: int) -> jobs_pb2.JobRecord:
    record = jobs_pb2.JobRecord.FromString(value)
    record.job.revision = revision
    return record


class JobApi:
    def __init__(self, store: JobStore, known_models: Callable[[], frozenset[str]]) -> None:
        self._store = store
        self._known_models = known_models

    async def read(self, job_id: str, tenant: str | None = None) -> jobs_pb2.JobRecord:
        """The record; NOT_FOUND when missing or owned by a tenant other than `tenant`."""
        found = await self._store.get(JOBS, job_key(r.check_id("job", job_id)))
        record = decode_job(*found) if found is not None else None
        if record is None or not r.owned_by(record.job.tenant, tenant):
            raise NotFound(f"no job {job_id!r} (unknown, or deleted after its retention)")
        return record

    # --- submit -------------------------------------------------------------------------------

    def _check(self, req: jobs_pb2.SubmitJobRequest) -> jobs_pb2.Job:
        if not req.HasField("request"):
            raise InvalidArgument("request is required: the GenerateRequest to run")
        valid = validate_request(req.request)
        if valid.resume_token_ids:
            raise InvalidArgument("resume_token_ids cannot be given to a job")
        if valid.model not in self._known_models():
            served = ", ".join(sorted(self._known_models())) or "none"
            raise NotFound(f"model {valid.model!r} is not served by this mesh (served models: {served})")
        now = r.now_ms()
        return jobs_pb2.Job(
            state=jobs_pb2.JOB_STATE_QUEUED, model=valid.model, priority=r.resolved_priority(req.priority),
            idempotency_key=r.check_idempotency_key(req.idempotency_key), metadata=r.check_metadata(dict(req.metadata)),
            created_at_ms=now, deadline_ms=now + 1000 * r.window_s(req.completion_window_s),
            retention_s=r.retention_s(req.retention_s))

    async def submit(self, req: jobs_pb2.SubmitJobRequest, tenant: str | None = None) -> tuple[jobs_pb2.Job, bool]:
        """The job, and whether it was created now (False: an earlier one with this key).
        `tenant` (the authenticated caller's) owns the job and its request runs as that tenant."""
        job = self._check(req)
        if tenant is not None:
            job.tenant = tenant
            req.request.tenant = tenant  # its cache partition and quota are the caller's, whatever it named
        body = jobs_pb2.SubmitJobRequest()
        body.CopyFrom(req)
        body.idempotency_key = ""
        sha = r.digest(body.SerializeToString(deterministic=True))
        job.job_id = r.new_id("job")
        if job.idempotency_key:
            first = await self._claim_key(job, sha)
            if first is not None:
                return first, False
        record = jobs_pb2.JobRecord(job=job, body_sha256=sha)
        revision = await self._store.create(JOBS, job_key(job.job_id), record.SerializeToString())
        if revision is None:  # a concurrent retry with the same key stored it first
            return (await self.read(job.job_id)).job, False
        job.revision = revision
        await self._enqueue(job, req)
        return job, True

    async def _claim_key(self, job: jobs_pb2.Job, sha: str) -> jobs_pb2.Job | None:
        """Bind the idempotency key to this job id; or return the job it already names (None when
        that submission died before storing its job: this one finishes it under its id)."""
        scoped = f"{job.tenant}\0{job.idempotency_key}" if job.tenant else job.idempotency_key  # per tenant
        key = f"idem.{r.key_digest(scoped)}"
        ttl = (job.deadline_ms - job.created_at_ms) / 1000 + job.retention_s
        claim = jobs_pb2.JobRecord(job=jobs_pb2.Job(job_id=job.job_id), body_sha256=sha)
        if await self._store.create(JOBS, key, claim.SerializeToString(), ttl_s=ttl) is not None:
            return None
        found = await self._store.get(JOBS, key)
        if found is None:
            raise FailedPrecondition("the idempotency key expired while it was read; submit again")
        first = jobs_pb2.JobRecord.FromString(found[0])
        if first.body_sha256 != sha:
            raise FailedPrecondition(f"idempotency_key {job.idempotency_key[:64]!r} was used for job "
                                     f"{first.job.job_id} with a different body; use a new key")
        job.job_id = first.job.job_id
        existing = await self._store.get(JOBS, job_key(job.job_id))
        return decode_job(*existing).job if existing is not None else None

    async def _enqueue(self, job: jobs_pb2.Job, req: jobs_pb2.SubmitJobRequest) -> None:
        item = jobs_pb2.WorkItem(job_id=job.job_id, request=req.request, deadline_ms=job.deadline_ms)
        item.request.ClearField("priority")  # workers set the background priority
        subject = work_subject(r.band(job.priority), r.model_token(job.model))
        await self._store.enqueue(subject, item.SerializeToString(), msg_id=job.job_id)

    # --- read ---------------------------------------------------------------------------------

    async def get(self, job_id: str, tenant: str | None = None) -> jobs_pb2.Job:
        return (await self.read(job_id, tenant)).job

    async def list(self, req: jobs_pb2.ListJobsRequest, tenant: str | None = None) -> tuple[list[jobs_pb2.Job], str]:
        size = r.page_size(req.page_size)
        if req.page_token:
            r.check_id("job", req.page_token)
        states, wanted = set(req.states), dict(req.metadata)
        jobs = []
        async for _, value, revision in self._store.scan(JOBS, "job."):
            job = decode_job(value, revision).job
            if not r.owned_by(job.tenant, tenant):
                continue
            if req.page_token and job.job_id >= req.page_token:
                continue
            if states and job.state not in states or req.model and job.model != req.model:
                continue
            if any(job.metadata.get(k) != v for k, v in wanted.items()):
                continue
            jobs.append(job)
        jobs.sort(key=lambda j: j.job_id, reverse=True)
        page = jobs[:size]
        return page, page[-1].job_id if len(jobs) > size else ""

    async def result(self, job_id: str, tenant: str | None = None) -> tuple[jobs_pb2.Job, jobs_pb2.JobRecord]:
        record = await self.read(job_id, tenant)
        state = record.job.state
        if state == jobs_pb2.JOB_STATE_SUCCEEDED:
            return record.job, record
        if state in r.JOB_FINAL:
            why = f": {record.job.error_message}" if record.job.error_message else ""
            raise FailedPrecondition(f"job {job_id} has no result: it is {r.state_name(state)}{why}")
        raise FailedPrecondition(f"job {job_id} is {r.state_name(state)}, not finished yet; WatchJob follows it")

    # --- cancel and watch ---------------------------------------------------------------------

    async def cancel(self, job_id: str, tenant: str | None = None) -> jobs_pb2.Job:
        while True:
            record = await self.read(job_id, tenant)
            job = record.job
            if job.state == jobs_pb2.JOB_STATE_CANCELLED:
                return job
            if job.state in r.JOB_FINAL:
                raise FailedPrecondition(f"job {job_id} already finished ({r.state_name(job.state)}); "
                                         "nothing to cancel")
            job.state, job.finished_at_ms = jobs_pb2.JOB_STATE_CANCELLED, r.now_ms()
            job.error_code, job.error_message = "CANCELLED", "cancelled by the client"
            revision = await self._store.cas(JOBS, job_key(job_id), record.SerializeToString(), job.revision,
                                             ttl_s=job.retention_s)
            if revision is not None:
                job.revision = revision
                await self._signal_cancel(job_id)
                return job

    async def _signal_cancel(self, job_id: str) -> None:
        """Tell the worker running it at once (it also re-reads the record every second)."""
        if self._store.nc is None:
            return
        try:
            await self._store.nc.publish(CANCEL_SUBJECT, job_id.encode())
        except nats.errors.Error as exc:
            log.warning("cancel signal for %s not sent (%s); its worker notices within a second", job_id, exc)

    async def watch(self, job_id: str, after_revision: int, tenant: str | None = None) -> AsyncIterator[jobs_pb2.Job]:
        """The job's state now (if newer than after_revision), then each change until it ends."""
        await self.read(job_id, tenant)  # NOT_FOUND before the stream starts (and for other tenants)
        watcher = await self._store.kv[JOBS].watch(job_key(job_id))
        try:
            while True:
                try:
                    entry = await watcher.updates(timeout=30.0)
                except (nats.errors.TimeoutError, TimeoutError):
                    continue
                if entry is None or not entry.value or entry.operation in ("DEL", "PURGE"):
                    if entry is not None:
                        raise NotFound(f"job {job_id} was deleted (its retention passed)")
                    continue
                job = decode_job(entry.value, entry.revision or 0).job
                if job.revision > after_revision:
                    yield job
                if job.state in r.JOB_FINAL:
                    return
        finally:
            await watcher.stop()
