"""bench/results/traffic.{json,md}: the figures issue 12 asks for, with the run's conditions."""

from __future__ import annotations

import json
from pathlib import Path


def _f(value, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "n/a"
    return f"{value:.{digits}f}{unit}" if isinstance(value, float) else f"{value}{unit}"


def headline(results: dict) -> dict:
    canary, fb, ens = results.get("canary", {}), results.get("fallback", {}), results.get("ensemble", {})
    out: dict = {
        "to_not_ready": canary.get("rollout", {}).get("to_not_ready"),
        "rollout_errors": canary.get("rollout", {}).get("errors"),
        "split_error_points": canary.get("split", {}).get("split_error_points"),
        "rollback_s": canary.get("rollback", {}).get("rollback_s"),
        "fallback_failed": fb.get("fallback_failed"),
        "fallback_hop_p50_ms": fb.get("fallback_hop_p50_ms"),
    }
    if ens:
        out["ensemble_majority_accuracy"] = ens.get("majority_served_accuracy")
        out["ensemble_member_accuracies"] = {m["member"]: m["accuracy"] for m in ens.get("members", [])}
    return out


def markdown(results: dict) -> str:
    h = results["headline"]
    canary, fb, ens = results.get("canary", {}), results.get("fallback", {}), results.get("ensemble", {})
    lines = [f"# Traffic policy benchmark (issue 12){' - QUICK run' if results['quick'] else ''}", "",
             f"Run {results['started']} on {results['machine']}; load average before/after: "
             f"{results['loadavg_before']} / {results['loadavg_after']}. Took {results['seconds']:.0f}s.",
             *([f"Phases run again later: {results['updated']} (start time and load average of each)."]
               if results.get("updated") else []), "",
             "| figure | target | measured |", "|---|---|---|",
             f"| requests to a target not READY during a rollout | 0 | {_f(h['to_not_ready'])} "
             f"(client errors during the rollout: {_f(h['rollout_errors'])}) |",
             f"| split error over {canary.get('split', {}).get('requests', 'n/a')} requests (90/10) | <= 2 points | "
             f"{_f(h['split_error_points'], ' points', 2)} |",
             f"| automatic rollback after an injected fault | <= 120 s | {_f(h['rollback_s'], ' s')} |",
             f"| failed requests, primary pool SIGKILLed | 0 | {_f(h['fallback_failed'])} of "
             f"{_f(fb.get('requests'))} |",
             f"| p50 latency the fallback hop adds | - | {_f(h['fallback_hop_p50_ms'], ' ms')} (after settling: "
             f"{_f(fb.get('fallback_hop_p50_settled_ms'), ' ms')}) |", ""]
    if canary:
        r = canary["rollout"]
        lines += ["## Canary", "", f"Rollout: {r['requests']} requests, served {r['served']}; canary "
                  f"{'PROMOTED' if r['promoted'] else 'NOT promoted'}. Steps:", ""]
        lines += [f"- {t.get('phase', 'timeout')} step {t.get('step', '-')} ({t.get('weight', '-')}%): "
                  f"{t.get('reason', '')}" for t in r["timeline"]]
        rb = canary["rollback"]
        lines += ["", f"Rollback: the leader decided {_f(rb.get('rollback_s'), ' s')} after the fault began "
                  f"(error_rate 0.5 on the canary at 10%; default margins); the routers' last answer from v3 came "
                  f"{_f(rb.get('routers_off_v3_s'), ' s')} after the fault; client-visible errors in that time: "
                  f"{rb.get('client_errors_after_fault_before_rollback')} (Envoy retries an UNAVAILABLE that "
                  f"reached no client on another router, whose pick is usually the stable version; the canary's "
                  f"figures count every failed attempt). Reason: {rb.get('reason', '')}", "",
                  f"Split: observed {canary['split']['observed_percent']} at "
                  f"{canary['split']['requests_per_s']:.0f} requests/s through Envoy.", ""]
    if fb:
        lines += ["## Fallback", "", f"Routes: {fb['routes']}. Streams broken by the kill and resumed on "
                  f"the CPU pool: {fb['broken_by_kill_and_resumed']}. After the kill, p50 of streams straight to "
                  f"fb@cpu {_f(fb['p50_direct_ms'], ' ms')} (at the same time, {fb['workers'] // 2} clients), "
                  f"through the fallback link {_f(fb['p50_via_fallback_ms'], ' ms')} ({fb['workers']} clients; "
                  f"{fb['max_tokens']} tokens per stream at 200 tokens/s).", ""]
    if ens:
        lines += ["## Ensemble (SmolLM2-135M-Instruct, torch engine)", "",
                  f"{ens['questions']} arithmetic questions, answers compared on their last number.", "",
                  "| answerer | accuracy |", "|---|---|"]
        lines += [f"| member: {m['member']} | {m['accuracy']:.0%} |" for m in ens["members"]]
        lines += [f"| ensemble, majority vote (served) | {ens['majority_served_accuracy']:.0%} |"]
        lines += [f"| {k} over the members' answers (computed) | {v:.0%} |" for k, v in ens["offline_accuracy"].items()]
        if ens.get("error_kinds"):
            lines += ["", f"Errors: {ens['error_kinds']}"]
        lines += [""]
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path, name: str) -> None:
    results["headline"] = headline(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(results, indent=2, default=str) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(results))
