"""What the async benchmark's parts share: progress lines, percentiles, batch files in and out."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator

import grpc
from meshserve.v1 import controlplane_pb2 as cp
from meshserve.v1 import controlplane_pb2_grpc, jobs_pb2, jobs_pb2_grpc

from services.localmesh.mesh import LocalMesh


def progress(msg: str) -> None:
    print(f"[bench-async {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def deploy(mesh: LocalMesh, name: str, backend: str, replicas: int, options: dict[str, str],
           source: str = "") -> None:
    ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.controlplane))
    ctl.DeployModel(cp.DeployModelRequest(spec=cp.ModelSpec(name=name, backend=backend, replicas=replicas,
                                                            source=source, options=options)), timeout=10)


class ModelHalted(RuntimeError):
    """The control plane halted the model (its loads kept failing): the part stops and says so."""


def _deployment(mesh: LocalMesh, name: str) -> cp.Deployment | None:
    ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.controlplane))
    deps = [d for d in ctl.ListDeployments(cp.ListDeploymentsRequest(), timeout=10).deployments
            if d.spec.name == name]
    return deps[0] if deps else None


def check_not_halted(mesh: LocalMesh, name: str) -> None:
    """Raise ModelHalted when the control plane halted `name` (a part waiting on it would hang)."""
    dep = _deployment(mesh, name)
    if dep is not None and dep.halted:
        raise ModelHalted(f"{name} halted while the bench ran: {dep.unsatisfied_reason}")


def wait_ready(mesh: LocalMesh, name: str, replicas: int, timeout: float, retries: int = 2) -> list[str]:
    """Wait for READY replicas; a model the control plane halted after failed loads is retried
    (`meshctl model retry`) up to `retries` times, then ModelHalted. Returns the halts met."""
    ctl = controlplane_pb2_grpc.ControlPlaneServiceStub(grpc.insecure_channel(mesh.controlplane))
    deadline = time.monotonic() + timeout
    halts: list[str] = []
    retried_generation = 0
    while time.monotonic() < deadline:
        dep = _deployment(mesh, name)
        if dep is not None and dep.ready_replicas >= replicas:
            return halts
        # a halt of a generation before our retry is the control plane's view catching up
        if dep is not None and dep.halted and dep.spec.generation >= retried_generation:
            if len(halts) >= retries:
                raise ModelHalted(f"{name} halted again after {retries} retries: {dep.unsatisfied_reason}")
            halts.append(dep.unsatisfied_reason)
            progress(f"{name} halted ({dep.unsatisfied_reason}); retrying the load")
            resp = ctl.RetryModel(cp.RetryModelRequest(name=name), timeout=10)
            retried_generation = resp.deployment.spec.generation
        time.sleep(0.5)
    raise TimeoutError(f"{name}: {replicas} replicas not ready within {timeout:.0f}s")


def wait_batch(stub: jobs_pb2_grpc.JobServiceStub, batch_id: str, done: Callable[[jobs_pb2.Batch], bool],
               mesh: LocalMesh, model: str, timeout: float) -> jobs_pb2.Batch:
    """Poll the batch until `done`; ModelHalted or TimeoutError rather than waiting for ever."""
    deadline = time.monotonic() + timeout
    polls = 0
    while time.monotonic() < deadline:
        b = get_batch(stub, batch_id)
        if b is not None and done(b):
            return b
        polls += 1
        if polls % 10 == 0:
            check_not_halted(mesh, model)
        time.sleep(0.5)
    raise TimeoutError(f"batch {batch_id} did not reach the awaited state within {timeout:.0f}s")


def batch_file(n: int, model: str, max_tokens: int, prompt: Callable[[int], str], system: str = "") -> bytes:
    """n lines; with `system`, each line is a chat (that system message, then prompt(i) as the user's)."""
    def body(i: int) -> dict:
        if system:
            return {"model": model, "messages": [{"role": "system", "content": system},
                                                 {"role": "user", "content": prompt(i)}],
                    "sampling": {"max_tokens": max_tokens}}
        return {"model": model, "prompt": prompt(i), "sampling": {"max_tokens": max_tokens}}
    return "".join(json.dumps({"custom_id": f"line-{i}", "method": "POST", "url": "/v1/generate", "body": body(i)})
                   + "\n" for i in range(n)).encode()


def upload(stub: jobs_pb2_grpc.JobServiceStub, data: bytes) -> jobs_pb2.File:
    def parts() -> Iterator[jobs_pb2.UploadFileRequest]:
        yield jobs_pb2.UploadFileRequest(header=jobs_pb2.UploadFileHeader(filename="bench.jsonl", purpose="batch"))
        for i in range(0, len(data), 1 << 20):
            yield jobs_pb2.UploadFileRequest(data=data[i:i + (1 << 20)])
    return stub.UploadFile(parts(), timeout=120).file


def get_batch(stub: jobs_pb2_grpc.JobServiceStub, batch_id: str) -> jobs_pb2.Batch | None:
    """The batch, or None while no router answers (one was just killed)."""
    try:
        return stub.GetBatch(jobs_pb2.GetBatchRequest(batch_id=batch_id), timeout=10).batch
    except grpc.RpcError as exc:
        progress(f"GetBatch: {exc.code().name} ({exc.details()}); polling on")
        return None


def download(stub: jobs_pb2_grpc.JobServiceStub, file_id: str) -> list[dict]:
    if not file_id:
        return []
    raw = b"".join(p.data for p in stub.DownloadFile(jobs_pb2.DownloadFileRequest(file_id=file_id), timeout=300))
    return [json.loads(x) for x in raw.splitlines()]
