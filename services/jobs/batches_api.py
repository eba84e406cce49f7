"""The batch half of JobService as plain Python: files (upload, download) and batches.

Files go through a temporary file on disk in both directions, so a 200 MB upload never sits in
memory. A batch is a record (compare-and-set like a job's) plus a planning message: a worker
expands it into one work item per line (batches.py).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import AsyncIterator

from meshserve.v1 import jobs_pb2

from services.common.errors import FailedPrecondition, InvalidArgument, NotFound

from . import records as r
from .store import CANCEL_SUBJECT, JOBS, OUT, PLAN_SUBJECT, JobStore

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
MAX_PART = 4 * 1024 * 1024


def batch_key(batch_id: str) -> str:
    return f"batch.{batch_id}"


def file_key(file_id: str) -> str:
    return f"file.{file_id}"


def decode_batch(value: bytes, revision: int) -> jobs_pb2.Batch:
    batch = jobs_pb2.Batch.FromString(value)
    batch.revision = revision
    return batch


async def line_counts(store: JobStore, batch_id: str) -> tuple[int, int]:
    """(lines with an outcome, of which failed): exact, counted by the server."""
    done = await store.count(f"KV_{OUT}", f"$KV.{OUT}.{batch_id}.*")
    failed = await store.count(f"KV_{OUT}", f"$KV.{OUT}.{batch_id}.e.*")
    return done, failed


class BatchApi:
    def __init__(self, store: JobStore) -> None:
        self._store = store

    # --- files --------------------------------------------------------------------------------

    async def upload(self, parts: AsyncIterator[jobs_pb2.UploadFileRequest], tenant: str | None = None
                     ) -> jobs_pb2.File:
        header: jobs_pb2.UploadFileHeader | None = None
        size = lines = 0
        last = b"\n"
        with tempfile.TemporaryFile() as spool:
            async for part in parts:
                if part.HasField("header"):
                    if header is not None or size:
                        raise InvalidArgument("the header must be the first message, and only once")
                    header = part.header
                    continue
                if header is None:
                    raise InvalidArgument("the first message must be the header (filename, purpose)")
                if len(part.data) > MAX_PART:
                    raise InvalidArgument(f"data parts are at most {MAX_PART} bytes")
                size += len(part.data)
                if size > r.MAX_FILE_BYTES:
                    raise InvalidArgument(f"the file is over {r.MAX_FILE_BYTES} bytes (200 MB), the limit of a batch "
                                          "input; split it into several batches")
                lines += part.data.count(b"\n")
                if lines > r.MAX_FILE_LINES:
                    raise InvalidArgument(f"the file has over {r.MAX_FILE_LINES} lines, the limit of a batch input; "
                                          "split it into several batches")
                last = part.data[-1:] or last
                spool.write(part.data)
            if header is None:
                raise InvalidArgument("no header: send UploadFileHeader (filename, purpose) first")
            lines += 0 if last == b"\n" else 1
            if header.purpose != "batch":
                raise InvalidArgument(f"purpose must be 'batch', got {header.purpose[:32]!r}")
            if not 0 < lines <= r.MAX_FILE_LINES:
                raise InvalidArgument(f"a batch input needs 1 to {r.MAX_FILE_LINES} lines, got {lines}")
            spool.seek(0)
            return await self.store_file(spool, header.filename[:256] or "input.jsonl", "batch", size, lines,
                                         tenant or "")

    async def store_file(self, data, filename: str, purpose: str, size: int, lines: int,
                         tenant: str = "") -> jobs_pb2.File:
        file = jobs_pb2.File(file_id=r.new_id("file"), filename=filename, bytes=size, lines=lines, purpose=purpose,
                             created_at_ms=r.now_ms(), tenant=tenant)
        info = await self._store.files.put(file.file_id, data)
        file.sha256 = (info.digest or "").removeprefix("SHA-256=")
        await self._store.create(JOBS, file_key(file.file_id), file.SerializeToString())
        return file

    async def file(self, file_id: str, tenant: str | None = None) -> jobs_pb2.File:
        """The file's record; NOT_FOUND when missing or owned by a tenant other than `tenant`."""
        found = await self._store.get(JOBS, file_key(r.check_id("file", file_id)))
        file = jobs_pb2.File.FromString(found[0]) if found is not None else None
        if file is None or not r.owned_by(file.tenant, tenant):
            raise NotFound(f"no file {file_id!r} (unknown, or deleted after its batch's retention)")
        return file

    async def download(self, file_id: str, tenant: str | None = None
                       ) -> AsyncIterator[tuple[jobs_pb2.File | None, bytes]]:
        file = await self.file(file_id, tenant)
        with tempfile.TemporaryFile() as spool:
            await self._store.files.get(file_id, writeinto=spool)
            spool.seek(0)
            first: jobs_pb2.File | None = file
            while True:
                data = spool.read(CHUNK)
                if not data and first is None:
                    return
                yield first, data
                first = None
                if not data:
                    return

    # --- batches ------------------------------------------------------------------------------

    async def create(self, req: jobs_pb2.CreateBatchRequest, tenant: str | None = None) -> jobs_pb2.Batch:
        """The batch, owned by `tenant`: its lines run as that tenant (batches.py)."""
        file = await self.file(req.input_file_id, tenant)
        if file.purpose != "batch":
            raise InvalidArgument(f"file {file.file_id} is a {file.purpose} file, not a batch input")
        if req.endpoint not in ("", r.ENDPOINT):
            raise InvalidArgument(f"endpoint must be {r.ENDPOINT}, got {req.endpoint[:64]!r}")
        window = r.parse_window(req.completion_window)
        now = r.now_ms()
        batch = jobs_pb2.Batch(
            batch_id=r.new_id("batch"), status=jobs_pb2.BATCH_STATUS_VALIDATING, input_file_id=file.file_id,
            endpoint=r.ENDPOINT, completion_window=req.completion_window or "24h",
            priority=r.resolved_priority(req.priority), metadata=r.check_metadata(dict(req.metadata)),
            retention_s=r.retention_s(req.retention_s), created_at_ms=now, expires_at_ms=now + 1000 * window,
            tenant=tenant or "")
        batch.request_counts.total = file.lines
        revision = await self._store.create(JOBS, batch_key(batch.batch_id), batch.SerializeToString())
        batch.revision = revision or 0
        await self._store.enqueue(PLAN_SUBJECT, batch.batch_id.encode(), msg_id=batch.batch_id)
        return batch

    async def read(self, batch_id: str, tenant: str | None = None) -> jobs_pb2.Batch:
        """The record; NOT_FOUND when missing or owned by a tenant other than `tenant`."""
        found = await self._store.get(JOBS, batch_key(r.check_id("batch", batch_id)))
        batch = decode_batch(*found) if found is not None else None
        if batch is None or not r.owned_by(batch.tenant, tenant):
            raise NotFound(f"no batch {batch_id!r} (unknown, or deleted after its retention)")
        return batch

    async def get(self, batch_id: str, tenant: str | None = None) -> jobs_pb2.Batch:
        batch = await self.read(batch_id, tenant)
        if batch.status in (jobs_pb2.BATCH_STATUS_IN_PROGRESS, jobs_pb2.BATCH_STATUS_CANCELLING,
                            jobs_pb2.BATCH_STATUS_FINALIZING):
            done, failed = await line_counts(self._store, batch_id)
            batch.request_counts.completed, batch.request_counts.failed = done - failed, failed
        return batch

    async def list(self, req: jobs_pb2.ListBatchesRequest, tenant: str | None = None
                   ) -> tuple[list[jobs_pb2.Batch], str]:
        size = r.page_size(req.page_size)
        if req.page_token:
            r.check_id("batch", req.page_token)
        found = [decode_batch(value, rev) async for _, value, rev in self._store.scan(JOBS, "batch.")]
        found = sorted((b for b in found if (not req.page_token or b.batch_id < req.page_token)
                        and r.owned_by(b.tenant, tenant)),
                       key=lambda b: b.batch_id, reverse=True)
        page = found[:size]
        return page, page[-1].batch_id if len(found) > size else ""

    async def cancel(self, batch_id: str, tenant: str | None = None) -> jobs_pb2.Batch:
        while True:
            batch = await self.read(batch_id, tenant)
            if batch.status in (jobs_pb2.BATCH_STATUS_CANCELLING, jobs_pb2.BATCH_STATUS_CANCELLED):
                return batch
            if batch.status in r.BATCH_FINAL or batch.status == jobs_pb2.BATCH_STATUS_FINALIZING:
                raise FailedPrecondition(f"batch {batch_id} already {r.batch_status_name(batch.status)}; "
                                         "nothing to cancel")
            batch.status, batch.cancelling_at_ms = jobs_pb2.BATCH_STATUS_CANCELLING, r.now_ms()
            revision = await self._store.cas(JOBS, batch_key(batch_id), batch.SerializeToString(), batch.revision)
            if revision is not None:
                batch.revision = revision
                if self._store.nc is not None:
                    await self._store.nc.publish(CANCEL_SUBJECT, batch_id.encode())
                return batch
