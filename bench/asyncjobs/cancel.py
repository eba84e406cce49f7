"""Cancel latency: jobs queued and running on a slow sim model (5 tokens/s, 2 replicas of 8 slots,
filled to 75 % by the workers) are cancelled one by one.

A queued job's cancel is done when CancelJob returns (its record is CANCELLED; no worker may run
it after). A running job's cancel is done when the model server has ended its generation: the
servers' `meshserve_modelserver_requests_total{code="CANCELLED",model="slow"}` counters grow by one.
"""

from __future__ import annotations

import re
import time
import urllib.request

import grpc
from meshserve.v1 import inference_pb2, jobs_pb2, jobs_pb2_grpc

from services.localmesh.mesh import LocalMesh

from .common import check_not_halted, deploy, pct, progress, wait_ready

MODEL = "slow"
_CANCELLED = re.compile(r'meshserve_modelserver_requests_total\{code="CANCELLED",model="slow"\} ([0-9.]+)')


def _cancelled_at_servers(mesh: LocalMesh) -> int:
    total = 0.0
    for sid in mesh.servers:
        with urllib.request.urlopen(f"http://{mesh.metrics[sid]}/metrics", timeout=5) as resp:
            m = _CANCELLED.search(resp.read().decode())
        total += float(m.group(1)) if m else 0.0
    return int(total)


def run(mesh: LocalMesh, jobs: int = 24, timeout_s: float = 120.0) -> dict:
    # 5 tokens/s: the sim engine counts a sequence idle for 0.5 s between chunks as paused (not
    # running), which would make the replicas look empty and let workers take every job.
    deploy(mesh, MODEL, "sim", 2, {"max_running": "8", "tokens_per_second": "5"})
    wait_ready(mesh, MODEL, 2, 60)
    stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(mesh.envoy))
    ids = []
    for i in range(jobs):
        req = inference_pb2.GenerateRequest(model=MODEL, prompt=f"tick tock {i}")
        req.sampling.max_tokens = 1000
        ids.append(stub.SubmitJob(jobs_pb2.SubmitJobRequest(request=req), timeout=10).job.job_id)

    def states() -> list[int]:
        return [stub.GetJob(jobs_pb2.GetJobRequest(job_id=j), timeout=10).job.state for j in ids]
    deadline = time.monotonic() + timeout_s
    while states().count(jobs_pb2.JOB_STATE_RUNNING) < 8 and time.monotonic() < deadline:
        check_not_halted(mesh, MODEL)
        time.sleep(0.5)
    out: dict[str, list[float]] = {"running": [], "queued": []}
    # queued ones first: each running job cancelled frees a slot that a queued one would take
    snapshot = dict(zip(ids, states(), strict=True))
    for job_id in sorted(ids, key=lambda j: snapshot[j] == jobs_pb2.JOB_STATE_RUNNING):
        state = stub.GetJob(jobs_pb2.GetJobRequest(job_id=job_id), timeout=10).job.state
        before = _cancelled_at_servers(mesh)
        t0 = time.monotonic()
        stub.CancelJob(jobs_pb2.CancelJobRequest(job_id=job_id), timeout=10)
        if state == jobs_pb2.JOB_STATE_RUNNING:
            while _cancelled_at_servers(mesh) <= before and time.monotonic() - t0 < 30:
                time.sleep(0.02)
            out["running"].append(time.monotonic() - t0)
        else:
            out["queued"].append(time.monotonic() - t0)
    every = out["running"] + out["queued"]
    result = {"jobs": jobs, "running_cancelled": len(out["running"]), "queued_cancelled": len(out["queued"]),
              "cancel_p50_s": round(pct(every, 50), 3), "cancel_p99_s": round(pct(every, 99), 3),
              "running_p99_s": round(pct(out["running"], 99), 3), "queued_p99_s": round(pct(out["queued"], 99), 3),
              "running_max_s": round(max(out["running"], default=float("nan")), 3)}
    progress(f"cancel: {result}")
    return result
