"""JobService on the routers: a thin gRPC layer over JobApi and BatchApi (convert -> call -> convert).

The store connects in the background (services/jobs/server.py); until it has, every call is
UNAVAILABLE, and interactive traffic on the same router is unaffected either way. Callers are told
apart as for InferenceService (services/router/access.py): a tenant submits only to models it was
granted, within its quota, and sees only its own jobs, batches and files.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator

import grpc
from meshserve.v1 import jobs_pb2, jobs_pb2_grpc

from services.common.errors import Unavailable
from services.router.access import Access

from .batches_api import BatchApi
from .jobs_api import JobApi
from .store import StoreErrors

SERVICE_NAME = jobs_pb2.DESCRIPTOR.services_by_name["JobService"].full_name


@contextlib.contextmanager
def _store() -> Iterator[None]:
    """The store timed out or is between members (one died, a leader is being elected): the call
    may be retried, so it is UNAVAILABLE, never INTERNAL."""
    try:
        yield
    except StoreErrors as exc:
        raise Unavailable(f"the job store (JetStream) did not answer ({type(exc).__name__}: {exc}); retry shortly",
                          retry_after_ms=1000) from None


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, access: Access | None = None) -> None:
        self._access = access
        self._jobs: JobApi | None = None
        self._batches: BatchApi | None = None

    def _tenant(self, context: grpc.aio.ServicerContext) -> str | None:
        """The calling tenant (None: a caller inside the mesh, or no authentication)."""
        return self._access.caller(context).tenant if self._access is not None else None

    def attach(self, jobs: JobApi, batches: BatchApi) -> None:
        """The store is connected: start answering."""
        self._jobs, self._batches = jobs, batches

    @property
    def jobs(self) -> JobApi:
        if self._jobs is None:
            raise Unavailable("the job store (JetStream) is not reachable from this router yet; retry shortly",
                              retry_after_ms=1000)
        return self._jobs

    @property
    def batches(self) -> BatchApi:
        if self._batches is None:
            raise Unavailable("the job store (JetStream) is not reachable from this router yet; retry shortly",
                              retry_after_ms=1000)
        return self._batches

    async def SubmitJob(self, request: jobs_pb2.SubmitJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.SubmitJobResponse:
        tenant = None
        if self._access is not None:
            tenant = self._access.admit(context, request.request.model).tenant
        with _store():
            job, created = await self.jobs.submit(request, tenant)
            return jobs_pb2.SubmitJobResponse(job=job, created=created)

    async def GetJob(self, request: jobs_pb2.GetJobRequest,
                     context: grpc.aio.ServicerContext) -> jobs_pb2.GetJobResponse:
        with _store():
            return jobs_pb2.GetJobResponse(job=await self.jobs.get(request.job_id, self._tenant(context)))

    async def ListJobs(self, request: jobs_pb2.ListJobsRequest,
                       context: grpc.aio.ServicerContext) -> jobs_pb2.ListJobsResponse:
        with _store():
            jobs, token = await self.jobs.list(request, self._tenant(context))
            return jobs_pb2.ListJobsResponse(jobs=jobs, next_page_token=token)

    async def CancelJob(self, request: jobs_pb2.CancelJobRequest,
                        context: grpc.aio.ServicerContext) -> jobs_pb2.CancelJobResponse:
        with _store():
            return jobs_pb2.CancelJobResponse(job=await self.jobs.cancel(request.job_id, self._tenant(context)))

    async def WatchJob(self, request: jobs_pb2.WatchJobRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[jobs_pb2.WatchJobResponse]:
        with _store():
            async for job in self.jobs.watch(request.job_id, request.after_revision, self._tenant(context)):
                yield jobs_pb2.WatchJobResponse(job=job)

    async def GetJobResult(self, request: jobs_pb2.GetJobResultRequest,
                           context: grpc.aio.ServicerContext) -> jobs_pb2.GetJobResultResponse:
        with _store():
            job, record = await self.jobs.result(request.job_id, self._tenant(context))
            return jobs_pb2.GetJobResultResponse(job=job, response=record.response)

    async def UploadFile(self, request_iterator: AsyncIterator[jobs_pb2.UploadFileRequest],
                         context: grpc.aio.ServicerContext) -> jobs_pb2.UploadFileResponse:
        with _store():
            file = await self.batches.upload(request_iterator, self._tenant(context))
            return jobs_pb2.UploadFileResponse(file=file)

    async def DownloadFile(self, request: jobs_pb2.DownloadFileRequest,
                           context: grpc.aio.ServicerContext) -> AsyncIterator[jobs_pb2.DownloadFileResponse]:
        with _store():
            async for file, data in self.batches.download(request.file_id, self._tenant(context)):
                yield jobs_pb2.DownloadFileResponse(file=file, data=data)

    async def GetFile(self, request: jobs_pb2.GetFileRequest,
                      context: grpc.aio.ServicerContext) -> jobs_pb2.GetFileResponse:
        with _store():
            return jobs_pb2.GetFileResponse(file=await self.batches.file(request.file_id, self._tenant(context)))

    async def CreateBatch(self, request: jobs_pb2.CreateBatchRequest,
                          context: grpc.aio.ServicerContext) -> jobs_pb2.CreateBatchResponse:
        with _store():
            return jobs_pb2.CreateBatchResponse(batch=await self.batches.create(request, self._tenant(context)))

    async def GetBatch(self, request: jobs_pb2.GetBatchRequest,
                       context: grpc.aio.ServicerContext) -> jobs_pb2.GetBatchResponse:
        with _store():
            return jobs_pb2.GetBatchResponse(batch=await self.batches.get(request.batch_id, self._tenant(context)))

    async def ListBatches(self, request: jobs_pb2.ListBatchesRequest,
                          context: grpc.aio.ServicerContext) -> jobs_pb2.ListBatchesResponse:
        with _store():
            batches, token = await self.batches.list(request, self._tenant(context))
            return jobs_pb2.ListBatchesResponse(batches=batches, next_page_token=token)

    async def CancelBatch(self, request: jobs_pb2.CancelBatchRequest,
                          context: grpc.aio.ServicerContext) -> jobs_pb2.CancelBatchResponse:
        with _store():
            return jobs_pb2.CancelBatchResponse(batch=await self.batches.cancel(request.batch_id,
                                                                               self._tenant(context)))
