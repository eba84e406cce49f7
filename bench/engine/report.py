"""engine.json -> engine.md: the same figures as tables for people, plus the issue's targets."""

from __future__ import annotations

KEYS = ("output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")
LEVELS = ("1", "4", "16", "64", "poisson")


def _level(results: dict, workload: str, system: str, level: str) -> dict:
    return (results.get("workloads", {}).get(workload, {}).get("systems", {}).get(system, {}).get(level) or {})


def _tok_s(results: dict, workload: str, system: str, level: str) -> float | None:
    return _level(results, workload, system, level).get("output_tok_s")


def roofline(results: dict) -> dict | None:
    """Bytes-per-step bound at c=64 (weights + K/V read at the workload's mean context) and our
    fraction; beside it the FLOP bound (2 x parameters per token at the measured matmul rate), since
    on a CPU without native bf16 a 64-row step is compute-bound before it is memory-bound."""
    row = (results.get("micro") or {}).get("decode", {}).get("64")
    bw = (results.get("micro") or {}).get("bandwidth_gb_s")
    if not row or not bw:
        return None
    bound = 64 / (row["step_bytes"] / (bw * 1e9))
    ours = _tok_s(results, "greedy", "meshserve", "64")
    flops = results.get("flop_ceiling_tok_s")
    binding = min(bound, flops) if flops else bound
    return {"bound_tok_s": bound, "flop_bound_tok_s": flops, "ours": ours, "fraction": ours / bound if ours else None,
            "binding": "FLOPs" if flops and flops < bound else "bytes",
            "binding_fraction": ours / binding if ours else None,
            "forward_fraction": row.get("cpu_ops_roofline_fraction")}


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when a figure is missing, the numbers behind it)."""
    out: list[tuple[str, bool | None, str]] = []

    def check(label: str, ours: float | None, peer: float | None, factor: float, lower_is_better: bool = False):
        if ours is None or peer is None:
            out.append((label, None, "missing figure"))
            return
        met = ours <= peer * factor if lower_is_better else ours >= peer * factor
        out.append((label, met, f"{ours:.3g} vs {peer * factor:.3g}"))

    for w in ("greedy", "sampled"):
        for c in ("16", "64"):
            check(f"{w} c={c}: >= 1.0x vLLM-CPU tok/s (aim 1.5x)", _tok_s(results, w, "meshserve", c),
                  _tok_s(results, w, "vllm_cpu", c), 1.0)
    check("greedy c=1: decode tok/s >= llama.cpp", _tok_s(results, "greedy", "meshserve", "1"),
          _tok_s(results, "greedy", "llama_cpp", "1"), 1.0)
    if _tok_s(results, "greedy", "meshserve_int8", "1") is not None:  # both quantized: llama.cpp runs Q4_1
        check("greedy c=1, our int8 option: decode tok/s >= llama.cpp",
              _tok_s(results, "greedy", "meshserve_int8", "1"), _tok_s(results, "greedy", "llama_cpp", "1"), 1.0)
    check("greedy c=1: TTFT p50 <= vLLM-CPU (s)", _level(results, "greedy", "meshserve", "1").get("ttft_p50_s"),
          _level(results, "greedy", "vllm_cpu", "1").get("ttft_p50_s"), 1.0, lower_is_better=True)
    pre = (results.get("micro") or {}).get("prefill") or {}
    check("prefill with first half cached: >= 3x faster than cold", pre.get("speedup"), 1.0 if pre else None, 3.0)
    roof = roofline(results)
    check("c=64: >= 60% of the bytes-per-step roofline", roof["fraction"] if roof else None, 1.0 if roof else None,
          0.6)
    inv = results.get("invariance") or {}
    if "identical" in inv:
        same = all(v == inv["prompts"] for v in inv["identical"].values())
        out.append(("batch-invariant: identical greedy outputs (3 compositions, cached prefix)", same,
                    f"{inv['identical']} of {inv['prompts']}; cost {inv.get('cost')} of tok/s"))
    return out


def _fmt(v, key: str) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if key == "output_tok_s" else f"{v * 1000:.0f}"


def _table(results: dict, workload: str, notes: list[str]) -> list[str]:
    lines = ["| system | level | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | load1 before / max |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for name, sysres in results["workloads"][workload]["systems"].items():
        load = sysres.get("load_avg") or {}
        flag = f"{load.get('before', '-')} / {load.get('during_max', '-')}" + (" NOISY" if sysres.get("noisy") else "")
        if "error" in sysres:  # levels measured before the failure are still shown
            notes.append(f"- **{name}** ({workload}) stopped: {sysres['error'].strip().splitlines()[-1][:300]}")
            if not any(level in sysres for level in LEVELS):
                lines.append(f"| {name} | - | not run | | | | | {flag} |")
        for level in LEVELS:
            s = sysres.get(level)
            if s is None:
                continue
            if "output_tok_s" not in s:
                lines.append(f"| {name} | {level} | failed | | | | | {flag} |")
                notes.append(f"- **{name}** {workload} {level}: {str(s.get('error') or s.get('first_error'))[-300:]}")
                continue
            lines.append(f"| {name} | {level} | " + " | ".join(_fmt(s.get(k), k) for k in KEYS) + f" | {flag} |")
    return lines


def render(results: dict) -> str:
    wk = results["workload"]
    lines = ["# Engine benchmark", "",
             f"SmolLM2-135M ({results['parameters'] / 1e6:.1f} M parameters), {results['threads']} CPU threads. "
             f"Prompts {wk['prompt_tokens'][0]}-{wk['prompt_tokens'][1]} tokens, outputs "
             f"{wk['output_tokens'][0]}-{wk['output_tokens'][1]} tokens (EOS ignored). Workloads: "
             + ", ".join(f"{w} {s}" for w, s in wk.get("sampling", {}).items())
             + f". Closed loop at each concurrency with 2 x concurrency requests unless noted; 'poisson' = "
             f"{wk['poisson']['requests']} requests arriving at {wk['poisson']['rate_per_s']}/s.", "",
             "Each system runs alone, one after another; the 1-minute load average is recorded before and "
             "during its run, and a run is flagged NOISY when the machine was busy before it or the load "
             "exceeded its own threads + 1 (OpenMP threads slow down sharply under contention).", "",
             f"FLOP ceiling: {results['flop_ceiling_tok_s']:.0f} tok/s ({results.get('matmul_dtype', 'bf16')} "
             f"matmul {results.get('matmul_tflop_s', results.get('bf16_matmul_tflop_s', 0)):.2f} TFLOP/s, "
             "over 2 x parameters FLOPs per token).", ""]
    if results.get("levels_run", "all") != "all":
        lines += [f"**Partial run**: only the scenarios {results['levels_run']} (`--levels`); targets at "
                  "levels not run read n/a.", ""]
    if results.get("merged_runs", 1) > 1:
        lines += [f"**Merged**: figures from {results['merged_runs']} runs (`--merge`: a later run replaced "
                  "the levels it measured); each system's load average is that of its latest run.", ""]
    if results.get("system_levels"):
        lines += ["Narrowed per system (`--system-levels`): " + ", ".join(results["system_levels"]) + ".", ""]
    notes: list[str] = []
    for w in results.get("workloads", {}):
        lines += [f"## Workload: {w}", "", "Output tokens/s (aggregate); TTFT and inter-token latency (ITL) in ms.",
                  "", *_table(results, w, notes), ""]
        for name, sysres in results["workloads"][w]["systems"].items():
            if sysres.get("note") and w == next(iter(results["workloads"])):
                notes.append(f"- **{name}**: {sysres['note']}")
    lines += _micro(results)
    lines += ["## Targets", "", "| target | met | figures |", "|---|---|---|"]
    for label, met, figures in targets(results):
        lines.append(f"| {label} | {'yes' if met else ('n/a' if met is None else 'no')} | {figures} |")
    lines += ["", "## Systems", "", *notes, ""]
    return "\n".join(lines)


def _micro(results: dict) -> list[str]:
    m = results.get("micro") or {}
    if "decode" not in m:
        return ["## Forward-only figures", "", f"not measured: {str(m.get('error', 'skipped'))[-300:]}", ""]
    lines = ["## Forward-only figures (one decode step, SmolLM2, " + str(m.get("dtype")) + ")", "",
             f"Measured memory bandwidth {m['bandwidth_gb_s']} GB/s (large copy, read + write); contexts "
             f"around {m['context']} tokens; C++ ops: {m['cpu_ops']}.", "",
             "| batch | bytes/step (MB) | roofline ms | C++ ops ms | plain torch ms | int8 KV ms | "
             "int8 weights + KV ms | sample greedy ms | sample top-p ms |", "|---:" * 9 + "|"]
    for b, r in m["decode"].items():
        lines.append(f"| {b} | {r['step_bytes'] / 1e6:.0f} | {r['roofline_ms']} | {r.get('cpu_ops_ms', '-')} | "
                     f"{r.get('torch_ms', '-')} | {r.get('cpu_ops_kv8_ms', '-')} | {r.get('cpu_ops_int8_ms', '-')} | "
                     f"{r['sample_greedy_ms']} | {r['sample_top_p_ms']} |")
    pre = m.get("prefill") or {}
    if pre:
        lines += ["", f"Prefill of a {pre['tokens']}-token prompt: cold {pre['cold_ms']} ms, first half cached "
                      f"{pre['half_cached_ms']} ms ({pre['speedup']}x)."]
    roof = roofline(results)
    if roof and roof["ours"]:
        lines += ["", f"c=64 roofline: {roof['bound_tok_s']:.0f} tok/s if every step only streamed weights + K/V "
                      f"at the measured bandwidth; end to end we reach {roof['ours']:.0f} "
                      f"({roof['fraction'] * 100:.0f}%), the forward alone {roof['forward_fraction']}."]
        if roof["flop_bound_tok_s"]:
            fwd = ((results.get("micro") or {}).get("decode", {}).get("64") or {}).get("cpu_ops_ms")
            fwd_part = f"; one 64-row decode forward alone runs at {64e3 / fwd / roof['flop_bound_tok_s']:.0%} of it" \
                if fwd else ""
            lines += ["", f"The FLOP ceiling ({roof['flop_bound_tok_s']:.0f} tok/s) is lower, so compute binds here, "
                          f"not bandwidth: end to end we reach {roof['binding_fraction'] * 100:.0f}% of it counting "
                          f"output tokens only (each prompt token costs the same FLOPs and is not counted){fwd_part}."
                      if roof["binding"] == "FLOPs" else
                      f"The FLOP ceiling ({roof['flop_bound_tok_s']:.0f} tok/s) lies above the bytes bound."]
    inv = results.get("invariance") or {}
    if "identical" in inv:
        lines += ["", f"Batch-invariant mode ({inv['prompts']} prompts, {inv['tokens']} tokens, {inv['dtype']}): "
                      f"identical to each prompt alone: {inv['identical']}; {inv['invariant_tok_s']} vs "
                      f"{inv['normal_tok_s']} tok/s in normal mode (cost {inv['cost']}). Normal mode, alone vs "
                      f"odd chunking: {inv['normal_mode_identical_alone_vs_chunked']} identical."]
    return [*lines, ""]
