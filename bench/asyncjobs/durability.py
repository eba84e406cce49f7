"""Durability: one batch (sim engine) with no faults, then the same batch while a job worker, a
router and a JetStream member are SIGKILLed mid-run; every line must come back exactly once.

Mesh: 3-node JetStream (replicas 3), 2 routers behind Envoy, 2 sim servers, 3 job workers. Lost
= lines of the input with no entry in the output or error file; duplicates = custom_ids that
appear more than once there; a completed line must carry the sim engine's exact answer.
"""

from __future__ import annotations

import time
from collections import Counter

import grpc
from meshserve.v1 import jobs_pb2, jobs_pb2_grpc

from services.localmesh.mesh import LocalMesh

from .common import batch_file, check_not_halted, download, get_batch, loadavg, progress, upload

MODEL = "echo"
MAX_TOKENS = 12
#: (fraction of lines done, what to kill)
FAULTS = ((0.2, "jobworker0"), (0.4, "router0"), (0.6, "nats1"))


def prompt(i: int) -> str:
    # groups of lines share a prefix (as batches with one system prompt do)
    return f"group {i % 50} shares this prefix line {i}"


def expected(i: int) -> str:
    words = prompt(i).split()
    return " ".join(words[k % len(words)] for k in range(MAX_TOKENS))


def run_batch(mesh: LocalMesh, lines: int, faults: bool, timeout_s: float) -> dict:
    stub = jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(mesh.envoy))
    file = upload(stub, batch_file(lines, MODEL, MAX_TOKENS, prompt))
    started = time.monotonic()
    load_start = loadavg()
    batch = stub.CreateBatch(jobs_pb2.CreateBatchRequest(input_file_id=file.file_id), timeout=30).batch
    pending = list(FAULTS) if faults else []
    killed: list[dict] = []
    final = None
    polls = 0
    while time.monotonic() - started < timeout_s:
        b = get_batch(stub, batch.batch_id)
        if b is not None:
            done = b.request_counts.completed + b.request_counts.failed
            while pending and done >= pending[0][0] * lines:
                at, name = pending.pop(0)
                mesh.sup.kill(mesh.children[name])
                killed.append({"process": name, "at_fraction": at, "at_s": round(time.monotonic() - started, 1)})
                progress(f"durability: SIGKILL {name} at {done}/{lines} lines")
            if b.status in (jobs_pb2.BATCH_STATUS_COMPLETED, jobs_pb2.BATCH_STATUS_FAILED,
                            jobs_pb2.BATCH_STATUS_EXPIRED, jobs_pb2.BATCH_STATUS_CANCELLED):
                final = b
                break
        polls += 1
        if polls % 20 == 0:
            check_not_halted(mesh, MODEL)  # a halted model would leave the batch waiting to its timeout
        time.sleep(0.5)
    elapsed = time.monotonic() - started
    if final is None:
        raise TimeoutError(f"the batch did not finish within {timeout_s:.0f}s")
    return {"faults": killed, "seconds": round(elapsed, 1), "status": jobs_pb2.BatchStatus.Name(final.status),
            "loadavg_start": load_start, "loadavg_end": loadavg(), **_check(stub, final, lines)}


def _check(stub: jobs_pb2_grpc.JobServiceStub, batch: jobs_pb2.Batch, lines: int) -> dict:
    outputs, errors = download(stub, batch.output_file_id), download(stub, batch.error_file_id)
    seen = Counter(o["custom_id"] for o in outputs + errors)
    wrong = [o["custom_id"] for o in outputs
             if o["response"]["body"]["text"] != expected(int(o["custom_id"].split("-")[1]))]
    completed = sum(1 for o in outputs if o["custom_id"] not in wrong)
    return {"lines": lines, "completed": completed, "failed": len(errors),
            "completed_fraction": round(completed / lines, 6),
            "duplicates": sum(n - 1 for n in seen.values() if n > 1),
            "lost": sum(1 for i in range(lines) if f"line-{i}" not in seen),
            "wrong_answers": len(wrong), "error_codes": dict(Counter(e["error"]["code"] for e in errors)),
            "counts_reported": {"total": batch.request_counts.total, "completed": batch.request_counts.completed,
                                "failed": batch.request_counts.failed}}


def restore(mesh: LocalMesh) -> None:
    """Start what the fault run killed again (the cancel phase runs on this mesh next)."""
    mesh.start_nats_node(1)
    mesh.start_router(0)
    mesh.start_jobworker(0)
