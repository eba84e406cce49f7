"""bench/results/router.md from router.json: targets next to results, met or not."""

from __future__ import annotations


def _fmt(x: object) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def _cpu_split(overhead: dict) -> list[str]:
    """CPU ms per request of each process on the path through Envoy (utime + stime from /proc,
    background work included), when the run recorded it."""
    rows = [(rate, r["cpu_ms_per_request"]["envoy"]) for rate, r in
            sorted(overhead.items(), key=lambda kv: int(kv[0])) if "cpu_ms_per_request" in r]
    if not rows:
        return []
    procs = ("loadgen", "envoy", "router", "server")
    out = ["CPU ms per request by process, path through Envoy (every process shares the same "
           "cores: their sum x the rate above the cores available means the machine, not one "
           "process, is the limit):", "",
           "| rate (req/s) | " + " | ".join(procs) + " | sum |", "|---" * (len(procs) + 2) + "|"]
    for rate, cpu in rows:
        out.append(f"| {rate} | " + " | ".join(_fmt(float(cpu[p])) for p in procs) +
                   f" | {_fmt(float(sum(cpu[p] for p in procs)))} |")
    return out + [""]


def markdown(d: dict) -> str:
    lines = ["# Router benchmarks", "",
             "Loopback, 2 CPU cores shared by every process (etcd, Envoy, router, servers and the "
             "load generator). Regenerate with `make bench-router`.", ""]
    if "overhead" in d:
        lines += ["## Overhead (sim engine, 2-token answers, open loop)", "",
                  "| rate (req/s) | added p50 ms (Envoy+router) | added p99 ms | router only p50 | "
                  "router only p99 | target |", "|---|---|---|---|---|---|"]
        for rate, r in sorted(d["overhead"].items(), key=lambda kv: int(kv[0])):
            target = ""
            if rate == "500":
                met = r["added_p50_ms"] <= 1 and r["added_p99_ms"] <= 5
                target = f"p50 <= 1, p99 <= 5: {'met' if met else 'NOT met'}"
            lines.append(f"| {rate} | {_fmt(r['added_p50_ms'])} | {_fmt(r['added_p99_ms'])} | "
                         f"{_fmt(r.get('router_only_added_p50_ms', ''))} | "
                         f"{_fmt(r.get('router_only_added_p99_ms', ''))} | {target} |")
        lines += ["", f"Largest rate one router sustained (no errors, >= 95% of offered, p99 < "
                      f"250 ms): **{d.get('max_rps_one_router', 'n/a')} req/s**", ""]
        c = d.get("overhead_conditions")
        if c:
            lines += [f"Measured on {c['cpus']} CPUs with a 1-minute load average of "
                      f"{c['loadavg_1m_at_start']} at the start (anything above the router "
                      "bench's own processes is other work competing for the same cores).", ""]
        lines += _cpu_split(d["overhead"])
    if "mtls_overhead" in d:
        from .mtls import markdown as mtls_markdown
        lines += mtls_markdown(d["mtls_overhead"])
    if "multiturn" in d:
        m = d["multiturn"]
        w = m.get("workload", {})
        lines += [f"## Multi-turn chat ({w.get('sessions')} sessions x {w.get('turns')} turns, "
                  f"{w.get('max_tokens')} tokens per answer, {w.get('engine')}, 3 servers)", "",
                  "| policy | TTFT p50 s | TTFT p99 s | output tok/s |", "|---|---|---|---|"]
        for p in ("round_robin", "least_load", "meshserve"):
            if p in m:
                lines.append(f"| {p} | {_fmt(m[p]['ttft_p50_s'])} | {_fmt(m[p]['ttft_p99_s'])} | "
                             f"{_fmt(m[p]['output_tok_s'])} |")
        if "round_robin" in m and "meshserve" in m:
            ratio = m["round_robin"]["ttft_p50_s"] / max(1e-9, m["meshserve"]["ttft_p50_s"])
            faster = m["meshserve"]["output_tok_s"] > m["round_robin"]["output_tok_s"]
            lines += ["", f"TTFT p50 round_robin / meshserve = {ratio:.2f}x (target >= 3x: "
                          f"{'met' if ratio >= 3 else 'NOT met'}); throughput higher than "
                          f"round_robin: {'yes' if faster else 'no'}", ""]
    if "failover" in d:
        f = d["failover"]
        lines += ["## Failover (SIGKILL 1 of 3 sim servers mid-run, through Envoy)", "",
                  f"{f['requests']} requests, {f['failed']} failed "
                  f"(target 0: {'met' if f['failed'] == 0 else 'NOT met'}); router retries "
                  f"{f.get('retries', 0):.0f}, migrations {f.get('migrations', 0):.0f}", ""]
    return "\n".join(lines) + "\n"
