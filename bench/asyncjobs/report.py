"""bench/results/async.md from the JSON figures."""

from __future__ import annotations

TARGETS = {"lost": "0", "duplicates": "0", "completed_fraction": "1.0", "interactive_ttft_p99_ratio": "<= 1.10",
           "cancel_p99_s": "<= 5"}


def _verdict(key: str, value: object) -> str:
    if not isinstance(value, int | float):
        return "-"
    ok = {"lost": value == 0, "duplicates": value == 0, "completed_fraction": value == 1.0,
          "interactive_ttft_p99_ratio": value <= 1.10, "cancel_p99_s": value <= 5.0}.get(key)
    return "-" if ok is None else ("met" if ok else "NOT met")


def markdown(out: dict) -> str:
    m = out["machine"]
    lines = [
        "# Asynchronous serving benchmark (issue 11)", "",
        f"Run {out['started']}{' (smoke)' if out['smoke'] else ''}; {m['cpus']} CPUs, load average "
        f"{m['loadavg_before']} before, {m['loadavg_after']} after. The machine is shared with other "
        "engineers' test runs: a load average above the CPU count means the figures are noisy.", "",
        "| figure | value | target | verdict |", "|---|---|---|---|"]
    for key, value in out["summary"].items():
        lines.append(f"| {key} | {value} | {TARGETS.get(key, '')} | {_verdict(key, value)} |")
    for part, error in out.get("errors", {}).items():
        lines += ["", f"**{part} failed**: `{error}`"]
    if "durability" in out:
        d = out["durability"]
        f = d["with_faults"]
        lines += ["", "## Durability (sim engine, 3-node JetStream, replicas 3)", "",
                  f"{f['lines']} lines. No faults: {d['no_faults']['seconds']} s. With faults: {f['seconds']} s "
                  f"({d['slowdown']}x), killed: " + ", ".join(f"{k['process']} at {int(k['at_fraction'] * 100)}% "
                                                              f"({k['at_s']} s)" for k in f["faults"]) + ".",
                  f"Completed {f['completed']}, failed {f['failed']} {f['error_codes']}, lost {f['lost']}, "
                  f"duplicates {f['duplicates']}, wrong answers {f['wrong_answers']}; counts the batch reported: "
                  f"{f['counts_reported']}. Load average {f['loadavg_start']} -> {f['loadavg_end']}."]
    if "coexist" in out:
        c = out["coexist"]
        w = c["windows"]
        lines += ["", f"## Coexistence ({c['engine']})", "",
                  f"Open-loop Poisson chat requests at {c['rate_per_s']}/s, 8 tokens each, {c['rounds']} rounds "
                  f"of two {c['window_s']} s windows: A (no batch), then B (a fresh batch filling idle capacity, "
                  "cancelled after the window).", "",
                  "| window | requests | failed | TTFT p50 s | TTFT p99 s | load average |",
                  "|---|---|---|---|---|---|"]
        for name, win in w.items():
            lines.append(f"| {name} | {win['requests']} | {win['failed']} | {win['ttft_p50_s']} | "
                         f"{win['ttft_p99_s']} | {win['loadavg_start']} |")
        lines += ["", f"TTFT p99 of all B samples / all A samples: **{c['interactive_ttft_p99_ratio']}** "
                  f"({c['batch_ttft_p99_s']} s / {c['baseline_ttft_p99_s']} s; p50 {c['batch_ttft_p50_s']} s / "
                  f"{c['baseline_ttft_p50_s']} s). Spread between A windows alone (worst p99 / best): "
                  f"{c['a_to_a_p99_ratio']}. The batches meanwhile: {c['batch_lines_per_s']} lines/s, "
                  f"{c['batch_tokens_per_s']} tokens/s over {c['batch_running_s']} s."]
        lines += ["", "Both model servers, the router, Envoy, the job worker and JetStream share the machine's "
                  "CPUs: background work on one server takes cores that another server's interactive prompt "
                  "needs, which no scheduling inside a server removes (on accelerators each server owns its "
                  "device). `python -m bench.asyncjobs.interference` (async-interference.md) separates the two: "
                  "background on the same engine vs on another engine process."]
        for halt in c.get("load_halts_retried", []):
            lines += ["", f"SmolLM2's first load was halted and retried by the bench: {halt}"]
    if "cancel" in out:
        c = out["cancel"]
        lines += ["", "## Cancel latency (sim engine)", "",
                  f"{c['running_cancelled']} running and {c['queued_cancelled']} queued jobs cancelled one by one: "
                  f"p50 {c['cancel_p50_s']} s, p99 {c['cancel_p99_s']} s (running: p99 {c['running_p99_s']} s, max "
                  f"{c['running_max_s']} s, until the model server ended the generation; queued: p99 "
                  f"{c['queued_p99_s']} s)."]
    if "queue" in out:
        q = out["queue"]
        lines += ["", "## Queue throughput (3-member clusters, no generation)", "",
                  "| store | jobs | seconds | jobs/s |", "|---|---|---|---|",
                  *(f"| {k} | {v['jobs']} | {v['seconds']} | {v['jobs_per_s']} |" for k, v in q.items())]
    return "\n".join(lines) + "\n"
