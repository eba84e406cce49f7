"""Jobs and batches end to end: through Envoy, on a 3-node JetStream cluster (replicas 3), run by
two job workers on a sim model; bad input gets precise statuses, a killed worker and a killed
JetStream member lose nothing and duplicate nothing."""

from __future__ import annotations

import json
import re

import grpc
import pytest
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, jobs_pb2, jobs_pb2_grpc

from services.localmesh.mesh import MeshPlan, ServerPlan
from tests.helpers import ask, meshctl, metrics_text, post_json, running_mesh, sim_text, wait_for

pytestmark = pytest.mark.e2e

FINAL = {jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED, jobs_pb2.JOB_STATE_CANCELLED,
         jobs_pb2.JOB_STATE_EXPIRED}


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    plan = MeshPlan(data_dir=tmp_path_factory.mktemp("jobs"), base_port=0, lease_ttl=3,
                    servers=[ServerPlan("server-0")], jetstream_nodes=3, job_workers=2,
                    job_worker_args=["--ack-wait", "3", "--fill", "1.0"])
    with running_mesh(plan) as m:
        ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(m.controlplane))
        for name, options in (("echo", {"max_running": "16", "tokens_per_second": "100"}),
                              ("slow", {"max_running": "4", "tokens_per_second": "2"})):
            ctl.DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(name=name, backend="sim", replicas=1,
                                                                    options=options)), timeout=10)
        yield m


@pytest.fixture(scope="module")
def jobs(mesh):
    with grpc.insecure_channel(mesh.envoy) as channel:
        stub = jobs_pb2_grpc.JobServiceStub(channel)
        probe = jobs_pb2.SubmitJobRequest(request=ask("warm up", 1), idempotency_key="warm-up")
        wait_for(lambda: stub.SubmitJob(probe, timeout=5), 60, "JobService answering with echo served")
        wait_for(lambda: stub.SubmitJob(jobs_pb2.SubmitJobRequest(request=ask("x", 1, model="slow")), timeout=5),
                 60, "slow served")
        yield stub


def finished(stub, job_id: str) -> jobs_pb2.Job:
    return wait_for(lambda: (j := stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=5).job).state in FINAL
                    and j, 60, f"job {job_id} finished")


def code_of(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code()


def test_a_job_runs_once_and_resubmitting_its_key_returns_it(jobs):
    submit = jobs_pb2.SubmitJobRequest(request=ask("alpha beta gamma", 5), idempotency_key="k-1",
                                       metadata={"team": "search"})
    first = jobs.SubmitJob(submit, timeout=5)
    again = jobs.SubmitJob(submit, timeout=5)
    assert first.created and not again.created and again.job.job_id == first.job.job_id
    seen = [e.job.state for e in jobs.WatchJob(jobs_pb2.WatchJobRequest(job_id=first.job.job_id), timeout=60)]
    assert seen[-1] == jobs_pb2.JOB_STATE_SUCCEEDED
    result = jobs.GetJobResult(jobs_pb2.GetJobResultRequest(job_id=first.job.job_id), timeout=5)
    assert result.response.text == sim_text("alpha beta gamma", 5) and result.response.usage.completion_tokens == 5
    other = jobs_pb2.SubmitJobRequest(request=ask("something else", 5), idempotency_key="k-1")
    assert code_of(lambda: jobs.SubmitJob(other, timeout=5)) == grpc.StatusCode.FAILED_PRECONDITION
    listed = jobs.ListJobs(jobs_pb2.ListJobsRequest(metadata={"team": "search"}), timeout=5).jobs
    assert [j.job_id for j in listed] == [first.job.job_id]


def test_bad_input_gets_precise_statuses(jobs):
    unknown_model = jobs_pb2.SubmitJobRequest(request=ask("x", 1, model="no-such-model"))
    assert code_of(lambda: jobs.SubmitJob(unknown_model, timeout=5)) == grpc.StatusCode.NOT_FOUND
    bad_window = jobs_pb2.SubmitJobRequest(request=ask("x", 1), completion_window_s=5)
    assert code_of(lambda: jobs.SubmitJob(bad_window, timeout=5)) == grpc.StatusCode.INVALID_ARGUMENT
    nobody = "job-000000000000000000000000"
    assert code_of(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=nobody), timeout=5)) == grpc.StatusCode.NOT_FOUND
    assert code_of(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id="../x"), timeout=5)) == \
        grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: jobs.GetBatch(jobs_pb2.GetBatchRequest(batch_id="batch-000000000000000000000000"),
                                         timeout=5)) == grpc.StatusCode.NOT_FOUND

    def too_many_lines():
        yield jobs_pb2.UploadFileRequest(header=jobs_pb2.UploadFileHeader(filename="big.jsonl", purpose="batch"))
        yield jobs_pb2.UploadFileRequest(data=b"{}\n" * 50_001)
    assert code_of(lambda: jobs.UploadFile(too_many_lines(), timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT


def test_cancel_stops_a_running_generation_and_leaves_no_result(mesh, jobs):
    job = jobs.SubmitJob(jobs_pb2.SubmitJobRequest(request=ask("tick tock", 200, model="slow")), timeout=5).job
    wait_for(lambda: jobs.GetJob(jobs_pb2.GetJobRequest(job_id=job.job_id), timeout=5).job.state ==
             jobs_pb2.JOB_STATE_RUNNING, 30, "the job running")
    cancelled = jobs.CancelJob(jobs_pb2.CancelJobRequest(job_id=job.job_id), timeout=5).job
    assert cancelled.state == jobs_pb2.JOB_STATE_CANCELLED
    server_metrics = mesh.metrics["server-0"]
    wait_for(lambda: re.search(r'meshserve_modelserver_requests_total\{code="CANCELLED",model="slow"\} [1-9]',
                               metrics_text(server_metrics)), 15, "the generation stopped at the model server")
    assert code_of(lambda: jobs.GetJobResult(jobs_pb2.GetJobResultRequest(job_id=job.job_id), timeout=5)) == \
        grpc.StatusCode.FAILED_PRECONDITION
    assert finished(jobs, job.job_id).state == jobs_pb2.JOB_STATE_CANCELLED  # no late result overwrote it


def test_a_batch_survives_a_killed_worker_and_jetstream_member(mesh, jobs, tmp_path):
    n = 240
    lines = [json.dumps({"custom_id": f"c{i}", "method": "POST", "url": "/v1/generate",
                         "body": {"model": "echo", "prompt": f"shared prefix words {i}",
                                  "sampling": {"max_tokens": 30}}}) for i in range(n)]
    lines[10] = "{not json"
    lines[20] = json.dumps({"custom_id": "c0", "url": "/v1/generate", "body": {"model": "echo", "prompt": "dup"}})
    data = ("\n".join(lines) + "\n").encode()

    def parts():
        yield jobs_pb2.UploadFileRequest(header=jobs_pb2.UploadFileHeader(filename="in.jsonl", purpose="batch"))
        yield jobs_pb2.UploadFileRequest(data=data)
    file = jobs.UploadFile(parts(), timeout=30).file
    batch = jobs.CreateBatch(jobs_pb2.CreateBatchRequest(input_file_id=file.file_id), timeout=5).batch

    def progress() -> int:
        counts = jobs.GetBatch(jobs_pb2.GetBatchRequest(batch_id=batch.batch_id), timeout=5).batch.request_counts
        return counts.completed
    wait_for(lambda: progress() >= 20, 60, "the batch under way")
    mesh.sup.kill(mesh.children["jobworker0"])
    mesh.sup.kill(mesh.children["nats1"])
    try:
        done = wait_for(lambda: (b := jobs.GetBatch(jobs_pb2.GetBatchRequest(batch_id=batch.batch_id), timeout=5)
                                 .batch).status == jobs_pb2.BATCH_STATUS_COMPLETED and b, 120, "the batch completed")
    finally:
        mesh.start_nats_node(1)
        mesh.start_jobworker(0)
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (n, n - 2, 2)

    def download(file_id: str) -> list[dict]:
        raw = b"".join(p.data for p in jobs.DownloadFile(jobs_pb2.DownloadFileRequest(file_id=file_id), timeout=30))
        return [json.loads(x) for x in raw.splitlines()]
    outputs, errors = download(done.output_file_id), download(done.error_file_id)
    ids = [o["custom_id"] for o in outputs]
    assert len(ids) == len(set(ids)) == n - 2  # every line once: none lost, none twice
    for o in outputs:
        i = int(o["custom_id"][1:])
        assert o["response"]["body"]["text"] == sim_text(f"shared prefix words {i}", 30)
    assert sorted(e["error"]["code"] for e in errors) == ["duplicate_custom_id", "invalid_json"]


def test_json_api_and_meshctl(mesh, jobs, tmp_path):
    body = {"request": {"model": "echo", "prompt": "json works", "sampling": {"max_tokens": 2}}}
    with post_json(mesh.envoy, "/v1/jobs", body) as resp:
        job = json.loads(resp.read())["job"]
    assert job["state"] in ("JOB_STATE_QUEUED", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED")
    assert finished(jobs, job["job_id"]).state == jobs_pb2.JOB_STATE_SUCCEEDED

    out = meshctl("--endpoint", mesh.envoy, "jobs", "submit", "echo", "one two", "--raw", "--max-tokens", "3",
                  "--watch")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "one two one" and "SUCCEEDED" in out.stderr
    path = tmp_path / "b.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"m{i}", "url": "/v1/generate",
                                        "body": {"model": "echo", "prompt": "p q", "sampling": {"max_tokens": 2}}})
                            + "\n" for i in range(5)))
    out = meshctl("--endpoint", mesh.envoy, "batch", "create", str(path), "--wait")
    assert out.returncode == 0, out.stderr
    assert "uploading b.jsonl" in out.stderr and "100.0%" in out.stderr and "completed" in out.stdout
    batch_id = re.search(r"batch-[0-9a-f]{24}", out.stdout).group(0)  # type: ignore[union-attr]
    out = meshctl("--endpoint", mesh.envoy, "batch", "results", batch_id)
    assert out.returncode == 0 and sorted(json.loads(x)["custom_id"] for x in out.stdout.splitlines()) == \
        [f"m{i}" for i in range(5)]
