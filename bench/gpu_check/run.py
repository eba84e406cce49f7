"""GPU acceptance check for the TensorRT-LLM backend (`make gpu-check`), a few minutes on one GPU.

Serves SmolLM2-135M (the embedded GGUF exported to a Hugging Face folder, or --model PATH) through
a local mesh - Envoy, a router, one model server on TensorRT-LLM and one on our torch engine - and
checks, as a client: the contract against the installed tensorrt_llm, streaming, stop strings,
logprobs, cancellation, priority order under load, non-zero KV figures in `meshctl status`; then
measures throughput at concurrency 1/16/64 on both backends. Writes bench/results/gpu_check.json
and .md; exits 1 if a check failed, 2 if this machine cannot run it (no GPU, no tensorrt_llm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "bench" / "engine")]
RESULTS = ROOT / "bench" / "results"
TRT_MODEL, TORCH_MODEL = "smollm2-trt", "smollm2-torch"


def preflight() -> str:
    """The tensorrt_llm version, or exit 2 saying exactly what is missing."""
    problems = []
    try:
        import torch

        if not torch.cuda.is_available():
            problems.append("no CUDA GPU is visible to torch (nvidia-smi? CUDA_VISIBLE_DEVICES?)")
    except ImportError:
        problems.append("torch is not installed")
    try:
        import tensorrt_llm

        version = str(tensorrt_llm.__version__)
    except ImportError as e:
        problems.append(f"tensorrt_llm cannot be imported ({e}); run this inside TensorRT-LLM's environment "
                        "(README: TensorRT-LLM on a GPU)")
        version = ""
    if problems:
        print("GPU CHECK CANNOT RUN HERE:\n  - " + "\n  - ".join(problems), file=sys.stderr)
        sys.exit(2)
    return version


def contract() -> tuple[bool, str]:
    from services.modelserver.trtllm.api import import_api
    from services.modelserver.trtllm.contract import compare, installed_surface

    api = import_api()
    problems = compare(installed_surface(api), api.version)
    return not problems, "; ".join(problems) or f"tensorrt_llm {api.version} matches contract.json"


def model_folder(arg: str) -> str:
    if arg:
        return arg
    from export_hf import export

    return export(str(ROOT / "bench" / ".cache" / "smollm2-hf"))


def run_checks(mesh, folder: str, quick: bool) -> tuple[list[dict], list[dict]]:
    import checks

    channel, stub = checks.make_stub(mesh.envoy)
    cp = mesh.controlplane
    results = []

    def record(name: str, fn) -> None:
        start = time.monotonic()
        try:
            ok, detail = fn()
        except Exception as e:  # noqa: BLE001 - a crashed check is a failed check, with its reason
            ok, detail = False, f"{type(e).__name__}: {e}"
        results.append({"check": name, "ok": ok, "detail": detail, "seconds": round(time.monotonic() - start, 2)})
        print(f"[{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)

    record("contract", contract)
    record("streaming", lambda: checks.streaming(stub, TRT_MODEL))
    record("stop strings", lambda: checks.stop_strings(stub, TRT_MODEL))
    record("logprobs", lambda: checks.logprobs(stub, TRT_MODEL))
    record("cancellation", lambda: checks.cancellation(
        stub, TRT_MODEL, lambda: int(checks.server_load(cp, "gpu-trt").get("running", 0))))
    record("priority order under load", lambda: checks.priority_order(stub, TRT_MODEL))
    record("KV figures in meshctl status", lambda: checks.kv_figures(cp, "gpu-trt"))
    perf = []
    for conc in (1, 16, 64):
        for model, n in ((TRT_MODEL, max(8, 2 * conc)), (TORCH_MODEL, max(4, conc))):
            if quick and conc > 16:
                continue
            row = {"backend": "tensorrt_llm" if model == TRT_MODEL else "torch",
                   **checks.throughput(stub, model, conc, n)}
            perf.append(row)
            print(f"  {row}", flush=True)
    channel.close()
    return results, perf


def write(version: str, results: list[dict], perf: list[dict]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    import torch

    meta = {"tensorrt_llm": version, "gpu": torch.cuda.get_device_name(0), "time": time.strftime("%Y-%m-%d %H:%M")}
    (RESULTS / "gpu_check.json").write_text(json.dumps({**meta, "checks": results, "throughput": perf}, indent=2))
    lines = [f"# GPU check: TensorRT-LLM {version} on {meta['gpu']} ({meta['time']})", "",
             "| check | result | detail |", "|---|---|---|"]
    lines += [f"| {r['check']} | {'PASS' if r['ok'] else 'FAIL'} | {r['detail']} |" for r in results]
    lines += ["", "| backend | concurrency | requests | output tok/s | TTFT p50 (s) |", "|---|---|---|---|---|"]
    lines += [f"| {p['backend']} | {p['concurrency']} | {p['requests']} | {p['output_tok_s']} | {p['ttft_p50_s']} |"
              for p in perf]
    (RESULTS / "gpu_check.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="", help="Hugging Face model folder (default: SmolLM2 exported)")
    parser.add_argument("--quick", action="store_true", help="skip concurrency 64")
    args = parser.parse_args()
    version = preflight()
    folder = model_folder(args.model)
    from services.localmesh.mesh import LocalMesh, MeshPlan, ServerPlan

    opts = ["max_context=2048", "max_running=16"]
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        plan = MeshPlan(data_dir=Path(tmp), base_port=0, load_timeout_s=600.0,
                        router_args=["--shed-utilization", "100"],  # let load reach the engine's own queue
                        servers=[ServerPlan("gpu-trt", [f"{TRT_MODEL}=tensorrt_llm:{folder}"], engine_options=opts),
                                 ServerPlan("gpu-torch", [f"{TORCH_MODEL}=torch:embedded"],
                                            engine_options=[*opts, f"threads={min(8, os.cpu_count() or 1)}"])])
        mesh = LocalMesh(plan)
        mesh.start()
        try:
            results, perf = run_checks(mesh, folder, args.quick)
        finally:
            mesh.stop()
    write(version, results, perf)
    failed = [r["check"] for r in results if not r["ok"]]
    print(f"GPU check: {len(results) - len(failed)} passed, {len(failed)} failed" +
          (f" ({', '.join(failed)})" if failed else "") + "; bench/results/gpu_check.{json,md}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
