"""Figures beside the end-to-end runs, each measured alone in its own process: forward-only micro
figures with the bytes-per-step roofline (micro.py) and the batch-invariant mode's check and cost
(invariance.py)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import quiet

HERE = os.path.dirname(os.path.abspath(__file__))
#: the closed-loop workload's mean context while decoding: mean prompt (272) + half the mean output (80)
MEAN_CONTEXT = 350


def _run(python: str, script: str, args: list[str], timeout: float, quiet_wait: float) -> dict:
    before, _ = quiet.wait_for_quiet(quiet_wait)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    try:
        proc = subprocess.run([python, os.path.join(HERE, script), *args, "--out", path], capture_output=True,
                              text=True, timeout=timeout, check=False)
        if proc.returncode != 0:
            return {"error": (proc.stderr or proc.stdout)[-800:]}
        with open(path, encoding="utf-8") as f:
            out = json.load(f)
    except subprocess.TimeoutExpired:
        return {"error": f"{script} ran past {timeout:.0f} s"}
    finally:
        os.unlink(path)
    out["load_avg"] = quiet.assess(before, [quiet.load1()], int(out.get("threads", 2)))
    return out


def run_all(python: str, quick: bool, threads: int, quiet_wait: float) -> dict:
    t = str(threads)
    if quick:
        micro = ["--batches", "1,4", "--context", "128", "--repeats", "1", "--prefill-tokens", "256"]
        inv = ["--prompts", "4", "--tokens", "6"]
    else:
        micro = ["--batches", "1,16,64", "--context", str(MEAN_CONTEXT), "--repeats", "5"]
        inv = []
    print("micro figures (forward only, roofline) ...", flush=True)
    out = {"micro": _run(python, "micro.py", [*micro, "--threads", t], 1800, quiet_wait)}
    print(f"  {json.dumps(out['micro'])[:400]}", flush=True)
    print("batch-invariant mode check ...", flush=True)
    out["invariance"] = _run(python, "invariance.py", [*inv, "--threads", t], 3600, quiet_wait)
    print(f"  {json.dumps(out['invariance'])[:400]}", flush=True)
    return out
