"""meshctl commands for asynchronous serving: jobs submit|get|list|cancel|watch and
batch create|get|list|cancel|results, against the public endpoint (Envoy)."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from typing import cast

import grpc
from meshserve.v1 import jobs_pb2, jobs_pb2_grpc

from services.jobs.records import batch_status_name, state_name

from .ctl_common import EXIT_OK, EXIT_REFUSED, emit
from .inference_client import build_request
from .progress import Bar
from .tables import table

UPLOAD_CHUNK = 1024 * 1024
FINAL_BATCH = {"completed", "failed", "expired", "cancelled"}


def _stub(args) -> jobs_pb2_grpc.JobServiceStub:
    return jobs_pb2_grpc.JobServiceStub(grpc.insecure_channel(args.endpoint))


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{flag} {item!r} is not key=value")
        out[key] = value
    return out


def _priority(name: str) -> jobs_pb2.JobPriority:
    return cast(jobs_pb2.JobPriority, jobs_pb2.JobPriority.Value(f"JOB_PRIORITY_{name.upper()}"))


def _ms(ms: int) -> str:
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def _job_line(job: jobs_pb2.Job) -> str:
    why = f" ({job.error_code}: {job.error_message})" if job.error_message else ""
    return f"{job.job_id}  {state_name(job.state)}{why}"


# --- jobs ---------------------------------------------------------------------------------------

def cmd_submit(args) -> int:
    request = build_request(args.model, args.prompt, chat=not args.raw, max_tokens=args.max_tokens,
                            temperature=args.temperature)
    resp = _stub(args).SubmitJob(jobs_pb2.SubmitJobRequest(
        request=request, idempotency_key=args.key, priority=_priority(args.priority),
        completion_window_s=args.window, retention_s=args.retention, metadata=_pairs(args.meta, "--meta")),
        timeout=args.timeout)
    if not args.watch or args.output == "json":
        return emit(args, resp, f"{_job_line(resp.job)}{'' if resp.created else '  (existing job for this key)'}")
    print(f"{resp.job.job_id} submitted", file=sys.stderr)
    return _watch(args, resp.job.job_id)


def cmd_get(args) -> int:
    job = _stub(args).GetJob(jobs_pb2.GetJobRequest(job_id=args.job_id), timeout=args.timeout).job
    rows = [("job", job.job_id), ("state", state_name(job.state)), ("model", job.model),
            ("priority", jobs_pb2.JobPriority.Name(job.priority).removeprefix("JOB_PRIORITY_")),
            ("created", _ms(job.created_at_ms)), ("started", _ms(job.started_at_ms)),
            ("finished", _ms(job.finished_at_ms)), ("deadline", _ms(job.deadline_ms)), ("attempts", job.attempts),
            ("worker", job.worker_id or "-"), ("error", f"{job.error_code} {job.error_message}".strip() or "-"),
            *((f"meta {k}", v) for k, v in sorted(job.metadata.items()))]
    return emit(args, job, table(["FIELD", "VALUE"], rows))


def cmd_list(args) -> int:
    states = [jobs_pb2.JobState.Value(f"JOB_STATE_{s.upper()}") for s in args.state]
    resp = _stub(args).ListJobs(jobs_pb2.ListJobsRequest(
        states=states, model=args.model, metadata=_pairs(args.meta, "--meta"), page_size=args.limit,
        page_token=args.page_token), timeout=args.timeout)
    text = table(["JOB", "STATE", "MODEL", "CREATED", "FINISHED", "ATTEMPTS"],
                 [(j.job_id, state_name(j.state), j.model, _ms(j.created_at_ms), _ms(j.finished_at_ms), j.attempts)
                  for j in resp.jobs])
    if resp.next_page_token:
        text += f"\nmore: --page-token {resp.next_page_token}"
    return emit(args, resp, text)


def cmd_cancel(args) -> int:
    job = _stub(args).CancelJob(jobs_pb2.CancelJobRequest(job_id=args.job_id), timeout=args.timeout).job
    return emit(args, job, _job_line(job))


def cmd_watch(args) -> int:
    return _watch(args, args.job_id)


def _watch(args, job_id: str) -> int:
    """State changes as they happen (resuming after a broken stream), then the answer."""
    stub, after, last = _stub(args), 0, None
    while last is None or last.state not in (jobs_pb2.JOB_STATE_SUCCEEDED, jobs_pb2.JOB_STATE_FAILED,
                                              jobs_pb2.JOB_STATE_CANCELLED, jobs_pb2.JOB_STATE_EXPIRED):
        try:
            for event in stub.WatchJob(jobs_pb2.WatchJobRequest(job_id=job_id, after_revision=after)):
                last, after = event.job, event.job.revision
                print(f"{time.strftime('%H:%M:%S')}  {_job_line(event.job)}", file=sys.stderr, flush=True)
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL) or after == 0:
                raise
            time.sleep(0.5)  # a router went away: resume after the last revision seen
    if last is not None and last.state == jobs_pb2.JOB_STATE_SUCCEEDED:
        result = stub.GetJobResult(jobs_pb2.GetJobResultRequest(job_id=job_id), timeout=args.timeout)
        return emit(args, result, result.response.text)
    return EXIT_REFUSED


# --- batches ------------------------------------------------------------------------------------

def _upload(stub: jobs_pb2_grpc.JobServiceStub, path: str, timeout: float) -> jobs_pb2.File:
    size = os.path.getsize(path)
    bar = Bar(f"uploading {os.path.basename(path)}", size, "B")

    def parts() -> Iterator[jobs_pb2.UploadFileRequest]:
        yield jobs_pb2.UploadFileRequest(header=jobs_pb2.UploadFileHeader(filename=os.path.basename(path),
                                                                          purpose="batch"))
        sent = 0
        with open(path, "rb") as f:
            while chunk := f.read(UPLOAD_CHUNK):
                sent += len(chunk)
                bar.update(sent)
                yield jobs_pb2.UploadFileRequest(data=chunk)

    try:
        return stub.UploadFile(parts(), timeout=max(timeout, 60 + size / 2**20)).file
    finally:
        bar.close()


def cmd_batch_create(args) -> int:
    stub = _stub(args)
    file = _upload(stub, args.file, args.timeout)
    print(f"uploaded {file.file_id}: {file.lines} lines, {file.bytes} bytes", file=sys.stderr)
    batch = stub.CreateBatch(jobs_pb2.CreateBatchRequest(
        input_file_id=file.file_id, completion_window=args.window, priority=_priority(args.priority),
        metadata=_pairs(args.meta, "--meta"), retention_s=args.retention), timeout=args.timeout).batch
    if args.wait:
        batch = _wait_batch(args, stub, batch.batch_id)
    return emit(args, batch, _batch_text(batch))


def _wait_batch(args, stub: jobs_pb2_grpc.JobServiceStub, batch_id: str) -> jobs_pb2.Batch:
    bar: Bar | None = None
    while True:
        batch = stub.GetBatch(jobs_pb2.GetBatchRequest(batch_id=batch_id), timeout=args.timeout).batch
        c, status = batch.request_counts, batch_status_name(batch.status)
        if bar is None and c.total:
            bar = Bar(f"batch {batch_id}", c.total, " lines")
        if bar is not None:
            bar.update(c.completed + c.failed, f"{status}, {c.failed} failed")
        if status in FINAL_BATCH:
            if bar is not None:
                bar.close()
            return batch
        time.sleep(1.0)


def _batch_text(b: jobs_pb2.Batch) -> str:
    c = b.request_counts
    rows = [("batch", b.batch_id), ("status", batch_status_name(b.status)), ("input", b.input_file_id),
            ("output", b.output_file_id or "-"), ("errors", b.error_file_id or "-"),
            ("lines", f"{c.total} total, {c.completed} completed, {c.failed} failed"),
            ("window", b.completion_window), ("created", _ms(b.created_at_ms)), ("expires", _ms(b.expires_at_ms)),
            *((("error", b.error_message),) if b.error_message else ())]
    return table(["FIELD", "VALUE"], rows)


def cmd_batch_get(args) -> int:
    stub = _stub(args)
    if args.wait:
        batch = _wait_batch(args, stub, args.batch_id)
    else:
        batch = stub.GetBatch(jobs_pb2.GetBatchRequest(batch_id=args.batch_id), timeout=args.timeout).batch
    return emit(args, batch, _batch_text(batch))


def cmd_batch_list(args) -> int:
    resp = _stub(args).ListBatches(jobs_pb2.ListBatchesRequest(page_size=args.limit, page_token=args.page_token),
                                   timeout=args.timeout)
    rows = [(b.batch_id, batch_status_name(b.status), b.request_counts.total, b.request_counts.completed,
             b.request_counts.failed, _ms(b.created_at_ms)) for b in resp.batches]
    text = table(["BATCH", "STATUS", "TOTAL", "COMPLETED", "FAILED", "CREATED"], rows)
    return emit(args, resp, text + (f"\nmore: --page-token {resp.next_page_token}" if resp.next_page_token else ""))


def cmd_batch_cancel(args) -> int:
    batch = _stub(args).CancelBatch(jobs_pb2.CancelBatchRequest(batch_id=args.batch_id), timeout=args.timeout).batch
    return emit(args, batch, _batch_text(batch))


def cmd_batch_results(args) -> int:
    stub = _stub(args)
    batch = stub.GetBatch(jobs_pb2.GetBatchRequest(batch_id=args.batch_id), timeout=args.timeout).batch
    if batch_status_name(batch.status) not in FINAL_BATCH:
        print(f"meshctl: batch {args.batch_id} is {batch_status_name(batch.status)}; results come once it ends "
              "(`meshctl batch get ID --wait`)", file=sys.stderr)
        return EXIT_REFUSED
    for file_id, path in ((batch.output_file_id, args.output_file), (batch.error_file_id, args.error_file)):
        if not file_id:
            continue
        with open(path, "wb") if path != "-" else os.fdopen(os.dup(1), "wb") as out:
            for part in stub.DownloadFile(jobs_pb2.DownloadFileRequest(file_id=file_id), timeout=args.timeout * 6):
                out.write(part.data)
        if path != "-":
            print(f"{file_id} -> {path}", file=sys.stderr)
    return EXIT_OK


# --- parsers ------------------------------------------------------------------------------------

def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--priority", default="normal", choices=["high", "normal", "low"],
                   help="queue band (every band runs below interactive traffic)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--retention", type=int, default=0, help="seconds results are kept (3600-2592000; 0 = 7 days)")


def add_parsers(sub) -> None:
    jobs = sub.add_parser("jobs", help="asynchronous jobs: submit|get|list|cancel|watch").add_subparsers(
        dest="jobs_command", required=True)
    p = jobs.add_parser("submit", help="queue one generation")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="send as a raw prompt, not a chat message")
    p.add_argument("--max-tokens", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--key", default="", help="idempotency key: resubmitting with it returns the first job")
    p.add_argument("--window", type=int, default=0, help="completion window in seconds (0 = 24 h)")
    p.add_argument("--watch", action="store_true", help="follow it and print the answer")
    _common(p)
    p.set_defaults(func=cmd_submit)
    p = jobs.add_parser("get", help="one job")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_get)
    p = jobs.add_parser("list", help="jobs, newest first")
    p.add_argument("--state", action="append", default=[],
                   choices=["queued", "running", "succeeded", "failed", "cancelled", "expired"])
    p.add_argument("--model", default="")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--page-token", default="")
    p.set_defaults(func=cmd_list)
    p = jobs.add_parser("cancel", help="cancel a queued or running job")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_cancel)
    p = jobs.add_parser("watch", help="follow a job's state, then print its answer")
    p.add_argument("job_id")
    p.set_defaults(func=cmd_watch)

    batch = sub.add_parser("batch", help="batches of a JSONL file: create|get|list|cancel|results").add_subparsers(
        dest="batch_command", required=True)
    p = batch.add_parser("create", help="upload a JSONL file and start a batch on it")
    p.add_argument("file", help='one request per line: {"custom_id", "method": "POST", "url": "/v1/generate", "body"}')
    p.add_argument("--window", default="24h", help="completion window, e.g. 24h, 90m, 2d")
    p.add_argument("--wait", action="store_true", help="show progress until it ends")
    _common(p)
    p.set_defaults(func=cmd_batch_create)
    p = batch.add_parser("get", help="one batch with its progress")
    p.add_argument("batch_id")
    p.add_argument("--wait", action="store_true", help="show progress until it ends")
    p.set_defaults(func=cmd_batch_get)
    p = batch.add_parser("list", help="batches, newest first")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--page-token", default="")
    p.set_defaults(func=cmd_batch_list)
    p = batch.add_parser("cancel", help="cancel a batch (lines running stop; finished ones are kept)")
    p.add_argument("batch_id")
    p.set_defaults(func=cmd_batch_cancel)
    p = batch.add_parser("results", help="download the output and error files of a finished batch")
    p.add_argument("batch_id")
    p.add_argument("--output-file", default="-", help="where outputs go ('-' = stdout)")
    p.add_argument("--error-file", default="-", help="where errors go ('-' = stdout)")
    p.set_defaults(func=cmd_batch_results)
