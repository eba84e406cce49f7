"""Tenants on JobService, through Envoy with API keys on a real secure mesh (JetStream, a job
worker): a tenant submits jobs only to the models it was granted, sees only its own jobs, batches
and files (another tenant's read NOT_FOUND, so ids cannot be probed), keeps its own idempotency
keys, and the lines of its batch run as that tenant, a line naming a model it was not granted
failing alone."""

from __future__ import annotations

import json
from collections.abc import Iterator

import grpc
import pytest
from meshserve.v1 import jobs_pb2, jobs_pb2_grpc

from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, running_mesh, wait_for

JOB_FINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED,
             jobs_pb2.JOB_STATE_EXPIRED}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalMesh]:
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("secure-jobs"), base_port=0, secure=True, lease_ttl=3,
                    servers=[ServerPlan("server-0", ["echo=sim", "other=sim"])], jetstream_nodes=1, job_workers=1)
    with running_mesh(plan) as m:
        yield m


class Tenant:
    """JobService as one tenant calls it: through Envoy with its API key."""

    def __init__(self, mesh: LocalMesh, key: str) -> None:
        self.channel = grpc.insecure_channel(mesh.envoy)
        self.stub = jobs_pb2_grpc.JobServiceStub(self.channel)
        self.md = (("authorization", f"Bearer {key}"),)

    def __getattr__(self, method: str):
        call = getattr(self.stub, method)
        return lambda req, timeout=10: call(req, timeout=timeout, metadata=self.md)

    def code_of(self, method: str, req) -> grpc.StatusCode:
        with pytest.raises(grpc.RpcError) as info:
            result = getattr(self, method)(req)
            if not hasattr(result, "ListFields"):  # a stream: the status comes with its first read
                list(result)
        return info.value.code()


@pytest.fixture(scope="module")
def tenants(mesh: LocalMesh) -> Iterator[dict[str, Tenant]]:
    """alpha may call echo only; beta may call echo and other."""
    out = {}
    for name, models in (("alpha", ["--model", "echo"]), ("beta", ["--model", "echo", "--model", "other"])):
        args = ("--controlplane", mesh.controlplane)
        made = meshctl(*args, "tenants", "create", name, *models, certs=mesh.certs_dir)
        assert made.returncode == 0, made.stderr
        key = meshctl(*args, "keys", "create", name, certs=mesh.certs_dir)
        assert key.returncode == 0, key.stderr
        out[name] = Tenant(mesh, key.stdout.strip())
    probe = jobs_pb2.SubmitJobRequest(request=ask("warm up", 1), idempotency_key="warm-up")
    wait_for(lambda: out["alpha"].SubmitJob(probe), 90, "JobService answering alpha through Envoy")
    yield out
    for t in out.values():
        t.channel.close()


def finished(t: Tenant, job_id: str) -> jobs_pb2.Job:
    return wait_for(lambda: (j := t.GetJob(jobs_pb2.GetJobRequest(job_id=job_id)).job).state in JOB_FINAL and j,
                    60, f"job {job_id} finished")


def test_a_tenants_jobs_are_its_own(tenants: dict[str, Tenant]) -> None:
    alpha, beta = tenants["alpha"], tenants["beta"]
    req = ask("red green", 3)
    req.tenant = "beta"  # naming another tenant changes nothing: the key decides
    job = alpha.SubmitJob(jobs_pb2.SubmitJobRequest(request=req)).job
    assert job.tenant == "alpha"
    assert finished(alpha, job.job_id).state == jobs_pb2.JOB_STATE_SUCCEEDED
    assert alpha.GetJobResult(jobs_pb2.GetJobResultRequest(job_id=job.job_id)).response.text
    for method, other in (("GetJob", jobs_pb2.GetJobRequest(job_id=job.job_id)),
                          ("GetJobResult", jobs_pb2.GetJobResultRequest(job_id=job.job_id)),
                          ("CancelJob", jobs_pb2.CancelJobRequest(job_id=job.job_id)),
                          ("WatchJob", jobs_pb2.WatchJobRequest(job_id=job.job_id))):
        assert beta.code_of(method, other) == grpc.StatusCode.NOT_FOUND, method
    assert job.job_id in {j.job_id for j in alpha.ListJobs(jobs_pb2.ListJobsRequest()).jobs}
    assert all(j.tenant == "beta" for j in beta.ListJobs(jobs_pb2.ListJobsRequest()).jobs)


def test_a_tenant_submits_only_to_models_it_was_granted(tenants: dict[str, Tenant]) -> None:
    denied = jobs_pb2.SubmitJobRequest(request=ask("x", 1, model="other"))
    assert tenants["alpha"].code_of("SubmitJob", denied) == grpc.StatusCode.PERMISSION_DENIED
    assert tenants["beta"].SubmitJob(denied).job.model == "other"


def test_idempotency_keys_are_per_tenant(tenants: dict[str, Tenant]) -> None:
    a = tenants["alpha"].SubmitJob(jobs_pb2.SubmitJobRequest(request=ask("one", 1), idempotency_key="same")).job
    b = tenants["beta"].SubmitJob(jobs_pb2.SubmitJobRequest(request=ask("two", 1), idempotency_key="same")).job
    assert a.job_id != b.job_id and (a.tenant, b.tenant) == ("alpha", "beta")


def test_a_tenants_batch_runs_as_that_tenant(tenants: dict[str, Tenant]) -> None:
    alpha, beta = tenants["alpha"], tenants["beta"]
    lines = [{"custom_id": "ok", "body": {"model": "echo", "prompt": "a b c", "sampling": {"max_tokens": 2}}},
             {"custom_id": "denied", "body": {"model": "other", "prompt": "a b c"}}]
    data = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()

    def parts():
        yield jobs_pb2.UploadFileRequest(header=jobs_pb2.UploadFileHeader(filename="in.jsonl", purpose="batch"))
        yield jobs_pb2.UploadFileRequest(data=data)
    file = alpha.UploadFile(parts()).file
    assert file.tenant == "alpha"
    assert beta.code_of("GetFile", jobs_pb2.GetFileRequest(file_id=file.file_id)) == grpc.StatusCode.NOT_FOUND
    assert beta.code_of("CreateBatch", jobs_pb2.CreateBatchRequest(input_file_id=file.file_id)) == \
        grpc.StatusCode.NOT_FOUND
    batch = alpha.CreateBatch(jobs_pb2.CreateBatchRequest(input_file_id=file.file_id)).batch
    assert batch.tenant == "alpha"
    assert beta.code_of("GetBatch", jobs_pb2.GetBatchRequest(batch_id=batch.batch_id)) == grpc.StatusCode.NOT_FOUND
    assert beta.code_of("CancelBatch", jobs_pb2.CancelBatchRequest(batch_id=batch.batch_id)) == \
        grpc.StatusCode.NOT_FOUND
    assert batch.batch_id not in {b.batch_id for b in beta.ListBatches(jobs_pb2.ListBatchesRequest()).batches}
    done = wait_for(lambda: (b := alpha.GetBatch(jobs_pb2.GetBatchRequest(batch_id=batch.batch_id)).batch).status
                    == jobs_pb2.BATCH_STATUS_COMPLETED and b, 90, "alpha's batch completed")
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 1)
    errors = b"".join(p.data for p in alpha.DownloadFile(jobs_pb2.DownloadFileRequest(file_id=done.error_file_id)))
    failed = json.loads(errors.decode().strip())
    assert failed["custom_id"] == "denied" and "PERMISSION_DENIED" in json.dumps(failed)
    assert beta.code_of("DownloadFile", jobs_pb2.DownloadFileRequest(file_id=done.output_file_id)) == \
        grpc.StatusCode.NOT_FOUND
    assert alpha.GetFile(jobs_pb2.GetFileRequest(file_id=done.output_file_id)).file.tenant == "alpha"
