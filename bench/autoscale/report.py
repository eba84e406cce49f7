"""autoscale.md: the figures against the issue's targets."""

from __future__ import annotations


def _f(v: object, fmt: str = "{:.1f}") -> str:
    return "-" if v is None else fmt.format(v) if isinstance(v, int | float) else str(v)


def _per_replica(s: dict) -> float:
    """Requests per second one replica serves at the target utilisation."""
    return s["max_running"] * s["target_utilization"] / (s["max_tokens"] / s["tokens_per_second"]
                                                        + s["first_token_latency_s"])


def targets(r: dict) -> list[tuple[str, str, str, bool]]:
    """(what, target, measured, met)."""
    react, pred = r["diurnal"]["reactive"], r["diurnal"]["predictive"]
    extra = r["predictive_extra_replica_seconds"]
    rows = [
        ("scale-up decision after load crosses the target", "<= 15 s", _f(r["scale_up_s"], "{:.1f} s"),
         r["scale_up_s"] is not None and r["scale_up_s"] <= 15),
        ("back to min after load stops", "<= 300 s", _f(r["scale_down_s"], "{:.1f} s"),
         r["scale_down_s"] is not None and r["scale_down_s"] <= 300),
        ("failed requests from zero (within the queue's capacity)", "0", str(r["from_zero_failed"]),
         r["from_zero_failed"] == 0),
        ("SLO violations, predictive vs reactive", ">= 30 % fewer",
         f"{pred['slo_violations']} vs {react['slo_violations']} "
         f"({_f(r['predictive_violation_reduction'], '{:.0%}')} fewer)",
         r["predictive_violation_reduction"] is not None and r["predictive_violation_reduction"] >= 0.3),
        ("replica-seconds, predictive vs reactive", "<= +10 %",
         f"{pred['replica_seconds']:.0f} vs {react['replica_seconds']:.0f} ({_f(extra, '{:+.1%}')})",
         extra is not None and extra <= 0.10),
        ("decisions above max or a budget", "0", str(r["limit_violations"]), r["limit_violations"] == 0),
    ]
    return rows


def markdown(r: dict) -> str:
    z, ramp, d = r["zero"], r["ramp"], r["diurnal"]
    lines = [f"# Autoscaling benchmark ({r['settings']['name']})", "",
             f"Run {r['started']}, {r['duration_s']:.0f} s; load average {r['load_before']} before, "
             f"{r['load_after']} after, {r['cpus']} CPUs{' (NOISY: ' + r['noise'] + ')' if r['noise'] else ''}.",
             "", "| target | issue | measured | met |", "|---|---|---|---|"]
    lines += [f"| {a} | {b} | {c} | {'yes' if ok else 'NO'} |" for a, b, c, ok in targets(r)]
    lines += ["", "## Ramp", "",
              f"Load {r['settings']['ramp_low_rps']} -> {r['settings']['ramp_peak_rps']} req/s over "
              f"{r['settings']['ramp_up_s']:.0f} s, held {r['settings']['ramp_hold_s']:.0f} s; default "
              f"policy, max {ramp['max_replicas']}, region budget {ramp['budget']} replicas. Target "
              f"{ramp['target_concurrency']:.1f} in flight per replica; load crossed it at "
              f"{_f(ramp['load_crossed_target_at_s'])} s, first scale-up decided at "
              f"{_f(ramp['first_scale_up_at_s'])} s; peak desired {ramp['peak_desired']}, placed "
              f"{ramp['peak_placed']}; back to min {_f(ramp['scale_down_s'])} s after the last request "
              f"was sent (READY count {_f(ramp['scale_down_ready_s'])} s); {ramp['failed']} of "
              f"{ramp['requests']} requests failed.", "",
              "Limits reported: " + ("; ".join(ramp["limits_reported"]) or "none"), "",
              "| at (s) | from | to | reason | limit |", "|---|---|---|---|---|"]
    lines += [f"| {x['at_s']} | {x['from']} | {x['to']} | {x['reason']} | {x['limit']} |"
              for x in ramp["decisions"]]
    lines += ["", "## From zero", "",
              f"{z['burst']} requests at once to a model scaled to zero (cold: its replica had been "
              f"unloaded): {z['from_zero_failed']} failed; time to first token p50 "
              f"{_f(z['ttft_from_zero_p50_s'], '{:.2f}')} s, max {_f(z['ttft_from_zero_max_s'], '{:.2f}')} s "
              f"(the sim engine takes {r['settings']['load_seconds']:.0f} s to load); went to zero "
              f"{_f(z['idle_to_zero_s'])} s after it was ready and idle; the router counted "
              f"{z['router_activation_waits_counted']:.0f} activation waits.", "",
              "## Diurnal", "",
              f"One compressed day of {d['window_s']:.0f} s (buckets of {r['settings']['bucket_s']:.0f} s) "
              f"after {r['settings']['warmup_s']:.0f} s of night, the same arrivals to both models; SLO: "
              f"time to first token <= {d['slo_ttft_s']:.1f} s. Lead time measured "
              f"{d['predictive'].get('lead_time_s')} s.", "",
              "| run | requests | SLO violations | failed | replica-seconds | peak placed |",
              "|---|---|---|---|---|---|"]
    for key in ("reactive", "predictive"):
        x = d[key]
        lines.append(f"| {key} | {x['requests']} | {x['slo_violations']} | {x['failed']} | "
                     f"{x['replica_seconds']:.0f} | {x['peak_placed']} |")
    b = d.get("backtest", {})
    if "mape" in b:
        lines += ["", f"Backtest on the recorded history ({b['buckets']} buckets, `meshctl autoscale "
                      f"backtest`): forecast WAPE {b['wape']:.1%} (MAPE {b['mape']:.1%}, night buckets "
                      f"weigh heavily there), RMSE {b['rmse']:.2f} req/s; buckets short of replicas "
                      f"{b['reactive_short_buckets']} reactive vs {b['predictive_short_buckets']} with "
                      f"the floor. Replay: `meshctl autoscale backtest bench/results/"
                      f"{r['settings']['name']}-trace.csv --bucket {r['settings']['bucket_s']:g} "
                      f"--season {r['settings']['season_s']:g} --lead {d['predictive'].get('lead_time_s', 0):.0f} "
                      f"--per-replica-rps {_per_replica(r['settings']):g} "
                      f"--max {r['settings']['diurnal_max_replicas']}`."]
    return "\n".join(lines) + "\n"
