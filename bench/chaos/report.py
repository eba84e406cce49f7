"""bench/results/chaos.md from chaos.json: one row per phase, then each phase's criteria and the
reasons of every failed request."""

from __future__ import annotations

from typing import Any

#: Per phase, the figure that best says how fast the mesh recovered (key, label).
HEADLINE = {
    1: ("restart_to_serving_s", "restart to serving"),
    2: ("resume_max_s", "slowest resume elsewhere"),
    3: ("restart_to_serving_s", "restart to serving"),
    4: ("deploy_ready_after_write_s", "deploy ready after write"),
    5: ("restart_to_healthy_s", "restart to healthy"),
    6: ("cont_to_quorum_s", "SIGCONT to quorum"),
    7: ("back_to_full_s", "back to 3 replicas"),
}


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return "n/a" if x != x else f"{x:.3g}"
    return "n/a" if x is None else str(x)


def _headline(p: dict[str, Any]) -> str:
    if p["phase"] == 8:
        parts = []
        for v, d in p["figures"].get("variants", {}).items():
            envoy = d["rss_mb"].get("envoy", {})
            parts.append(f"{v}: Envoy RSS {_fmt(envoy.get('before'))} -> {_fmt(envoy.get('peak_during'))} MB")
        return "; ".join(parts)
    key, label = HEADLINE.get(p["phase"], ("", ""))
    value = p["figures"].get(key)
    return f"{label} {_fmt(value)} s" if key else ""


def _table(d: dict[str, Any]) -> list[str]:
    out = ["| phase | requests | failed | lost / dup / reordered tokens | no final status | client resumes "
           "| TTFT p99 s | longest stall s | recovery | result |", "|---" * 10 + "|"]
    for p in d["phases"]:
        q = p["requests"]
        out.append(
            f"| {p['phase']}. {p['title']} | {q['requests']} | {q['failed']} | {q['lost_tokens']} / "
            f"{q['duplicated_tokens']} / {q['reordered_tokens']} | {q['no_final_status']} | "
            f"{q['client_resumes']} | {_fmt(q['ttft_s']['p99'])} | {_fmt(q['max_gap_s']['max'])} | "
            f"{_headline(p)} | {'PASS' if p['passed'] else '**FAIL**'} |")
    return out


def _phase_details(p: dict[str, Any]) -> list[str]:
    out = [f"### {p['phase']}. {p['title']}", "",
           f"{p['seconds']} s; load average {p['loadavg_start'][0]} at the start, {p['loadavg_end'][0]} "
           f"at the end; mesh whole again after {_fmt(p['restored_within_s'])} s"
           + (f" - NOT whole: {'; '.join(p['not_restored'])}" if p["not_restored"] else "")
           + (f"; repaired: {', '.join(p['repaired_after'])}" if p["repaired_after"] else "") + ".", ""]
    if p["harness_error"]:
        out += [f"Harness error: `{p['harness_error']}`", ""]
    out += [f"- [{'x' if c['met'] else ' '}] {c['name']}: {_fmt(c['value'])} (target {c['target']})"
            for c in p["criteria"]]
    out += _memory_and_ttft(p["figures"])
    figures = {k: v for k, v in p["figures"].items() if not isinstance(v, list | dict)}
    if figures:
        out += ["", "Figures: " + "; ".join(f"{k} = {_fmt(v)}" for k, v in figures.items())]
    q = p["requests"]
    if q["failure_reason_counts"]:
        out += ["", "Failed requests (status: message -> count):"]
        out += [f"- `{reason}` x {n}" for reason, n in q["failure_reason_counts"].items()]
    if q["no_final_status_ids"]:
        out += ["", f"Without a final status: {', '.join(q['no_final_status_ids'][:10])}"]
    return [*out, ""]


def _memory_and_ttft(f: dict[str, Any]) -> list[str]:
    """Phase 8: RSS of Envoy and the routers, and the readers' TTFT, per kind of non-reader."""
    variants = f.get("variants", {})
    if not variants:
        return []
    out = ["", "| non-readers | process | RSS before MB | peak during MB | growth in the last third MB "
           "| after MB |", "|---|---|---|---|---|---|"]
    for v, d in variants.items():
        out += [f"| {v} | {name} | {_fmt(r['before'])} | {_fmt(r['peak_during'])} | "
                f"{_fmt(r['growth_last_third'])} | {_fmt(r.get('after'))} |" for name, r in d["rss_mb"].items()]
    rows = [("without non-readers", f.get("ttft_without_nonreaders_s", {}))]
    for v, d in variants.items():
        rows += [(f"while {v} non-readers open", d.get("ttft_opening_s", {})),
                 (f"with {v} non-readers", d["ttft_with_s"]), (f"after {v} closed", d["ttft_after_s"])]
    out += ["", "| other clients' TTFT | requests | p50 s | p99 s | max s |", "|---|---|---|---|---|"]
    out += [f"| {label} | {t.get('n')} | {_fmt(t.get('p50'))} | {_fmt(t.get('p99'))} | {_fmt(t.get('max'))} |"
            for label, t in rows]
    out += ["", "; ".join(f"{v}: Envoy received {d['envoy_mb_while_held']['from_routers']} MB from the "
                          f"routers and sent {d['envoy_mb_while_held']['to_clients']} MB to clients while "
                          f"held" for v, d in variants.items() if "envoy_mb_while_held" in d)]
    out += ["", "; ".join(f"{v}: {d['first_chunk']}/{d['opened']} got a first chunk, held {d['held_s']} s"
                          f"{' (' + d['aborted'] + ')' if d['aborted'] else ''}, ended by the mesh while "
                          f"unread: {d['ended_by_mesh']}" for v, d in variants.items())]
    return out


def markdown(d: dict[str, Any]) -> str:
    m = d["machine"]
    lines = ["# Chaos benchmark (issue 8)", "",
             f"{'SMOKE run (short phases) - ' if d['settings']['smoke'] else ''}"
             f"Engine: **sim** (simulated: output token i depends only on the prompt and i, so every "
             f"answer is checked token by token) at {d['settings']['tokens_per_second']} tokens/s per "
             f"sequence. Mesh: 3-member etcd, 2 control planes, 3 model servers, 2 routers, Envoy, "
             f"real processes on loopback; {d['settings']['concurrency']} concurrent clients through "
             f"Envoy (gRPC, resuming with `services/client/resumable.astream`). Regenerate with "
             f"`make bench-chaos`.", "",
             f"Machine: {m['cpus']} CPUs, load average {m['loadavg_before']} before the mesh started"
             f"{' - **NOISY run**: ' + m['noisy_reason'] if m['noisy'] else ''}. Run took "
             f"{d['seconds']} s. Overall: **{'PASS' if d['passed'] else 'FAIL'}**.", ""]
    if d.get("error"):
        lines += [f"**The run was aborted:** `{d['error']}`", ""]
    lines += _table(d) + [""]
    lines += ["Pass criteria (issue 8): 0 failed requests, 0 lost or duplicated tokens, 0 requests without "
              "a final status, streams of a hung server resumed elsewhere within 5 s, a killed process "
              "restarted on its port serving within 5 s, memory bounded and other clients' latency "
              "unaffected by 100 non-reading streams.", ""]
    tb = d.get("log_tracebacks", {})
    lines += [f"Python tracebacks in the mesh's logs: {sum(tb.values()) if tb else 0}"
              + (f" ({', '.join(f'{k}: {v}' for k, v in tb.items())})" if tb else "") + ".", ""]
    lines += ["## Phases", ""]
    for p in d["phases"]:
        lines += _phase_details(p)
    return "\n".join(lines) + "\n"
