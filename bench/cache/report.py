"""bench/results/cache.{json,md}: the issue's figures first, then each phase's detail."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The keys issue 14 names, at the top of cache.json."""
    out: dict[str, Any] = {}
    cs = results.get("cross_server", {})
    if "reuse" in cs:
        out["cross_server_speedup"] = round(cs["reuse"]["speedup"], 2)
        out["cross_server_identical"] = cs["reuse"]["identical"]
        out["miss_overhead"] = round(cs["miss"]["overhead"], 4)
        out["miss_overhead_paired"] = round(cs["miss"]["paired_overhead"], 4)
        out["miss_cpu_overhead"] = round(cs["miss"]["cpu_overhead"], 4)
        out["cross_tenant_hits"] = cs["tenants"]["cross_tenant_hits"]
    rt = results.get("routing", {})
    for mode in ("round_robin", "meshserve_text", "meshserve"):
        if mode in rt:
            out[f"routing_{mode}"] = {"p90_ttft_s": round(rt[mode]["p90_ttft_s"], 3),
                                      "p90_ttft_warm_s": round(rt[mode].get("p90_ttft_warm_s", float("nan")), 3),
                                      "requests_per_s": round(rt[mode]["requests_per_s"], 3),
                                      "output_tok_s": round(rt[mode]["output_tok_s"], 2)}
    return out


def _miss_md(m: dict[str, Any], s: dict[str, Any]) -> list[str]:
    return [f"Miss cost (every look-up misses, every block written; {len(m['ttft_on_s'])} fresh prompts per "
            f"mode, interleaved; 1-min load average {min(m['loadavg_1m']):.1f}-{max(m['loadavg_1m']):.1f}): "
            f"TTFT p50 {m['p50_on_s']:.3f}s attached vs {m['p50_off_s']:.3f}s detached, "
            f"**miss_overhead {100 * s['miss_overhead']:+.1f}%** (target <= 5%); median within-round ratio "
            f"{100 * s['miss_overhead_paired']:+.1f}%. The tier's own CPU per attached request (offer on the step "
            f"thread, writer, look-up, redis-server) {statistics.median(m['tier_cpu_on_s']):.3f}s against "
            f"{m['cpu_off_s_median']:.2f}s for a detached request: **miss_cpu_overhead "
            f"{100 * s['miss_cpu_overhead']:+.1f}%**. TTFT on this shared machine moves "
            "with other processes' load; the CPU figure is what the tier itself costs.", ""]


def _md(results: dict[str, Any], s: dict[str, Any]) -> str:
    lines = ["# Shared cache benchmark (`make bench-cache`)", "",
             f"Started {results['started']} on {results['machine']}; load average before / after "
             f"{results['loadavg_before']} / {results['loadavg_after']}; took {results['seconds']:.0f}s."
             + (" QUICK run (harness check)." if results.get("quick") else ""), ""]
    cs = results.get("cross_server", {})
    if "reuse" in cs:
        r, m, t = cs["reuse"], cs["miss"], cs["tenants"]
        lines += ["## Cross-server reuse, miss cost, tenants (two torch engines, one store)", "",
                  f"dtype {cs['dtype']}; {len(r['trials'])} prefixes of ~{r['trials'][0]['prompt_tokens']} tokens "
                  f"computed on A, then asked on B. Medians:", "",
                  "| B's TTFT | seconds |", "|---|---|",
                  f"| recompute (tier detached, pool empty) | {r['recompute_ttft_s']:.3f} |",
                  f"| fetched from the shared tier (pool empty) | {r['shared_ttft_s']:.3f} |",
                  f"| own pool hit (host RAM on a CPU engine) | {r['local_hit_ttft_s']:.3f} |", "",
                  f"**cross_server_speedup {s['cross_server_speedup']}x** (target >= 5); greedy output identical "
                  f"to recomputing: {r['identical']}.", "",
                  *_miss_md(m, s),
                  f"Tenants: {t['cross_tenant_requests']} requests of other tenants for a prefix tenant-0 had "
                  f"stored: **cross_tenant_hits {t['cross_tenant_hits']}**; tenant-0 again: "
                  f"{t['same_tenant_cached_tokens']} of {t['prompt_tokens']} tokens cached.", ""]
    elif cs:
        lines += [f"cross_server phase failed: {cs.get('failed')}", ""]
    rt = results.get("routing", {})
    if "meshserve" in rt:
        lines += ["## Precise vs approximate routing (3 servers, one router)", "",
                  f"{rt['tenants']} tenants (two per system-prompt text, salted apart), "
                  f"{rt['requests_per_mode']} requests per mode at concurrency {rt['concurrency']}, "
                  f"{rt['kv_blocks_per_server']} KV blocks per server, store {rt['store_bytes'] >> 20} MiB; "
                  "cold caches per mode.", "",
                  "| mode | P50 TTFT s | P90 TTFT s | P50 / P90 after each tenant's first, s | requests/s | "
                  "output tok/s | prompt tokens cached |", "|---|---|---|---|---|---|---|"]
        for mode in ("round_robin", "meshserve_text", "meshserve"):
            x = rt[mode]
            warm = f"{x.get('p50_ttft_warm_s', float('nan')):.3f} / {x.get('p90_ttft_warm_s', float('nan')):.3f}"
            lines.append(f"| {mode} | {x['p50_ttft_s']:.3f} | {x['p90_ttft_s']:.3f} | {warm} | "
                         f"{x['requests_per_s']:.3f} | {x['output_tok_s']:.2f} | "
                         f"{100 * x['cached_token_share']:.0f}% |")
        lines.append("")
    elif rt:
        lines += [f"routing phase failed: {rt.get('failed')}", ""]
    return "\n".join(lines)


def write(results: dict[str, Any], out: Path, name: str) -> None:
    s = summary(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps({**s, "detail": results}, indent=2, default=str) + "\n")
    (out / f"{name}.md").write_text(_md(results, s) + "\n")
