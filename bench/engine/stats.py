"""Per-request timings -> the reported figures, the same code for every system."""

from __future__ import annotations


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks; None for no data."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def summarize(records: list[dict]) -> dict:
    """Aggregate output tokens/s over the scenario's span, TTFT and inter-token latency p50/p99."""
    ok = [r for r in records if r["times"] and not r["error"]]
    errors = [r["error"] for r in records if r["error"]]
    out: dict = {"requests": len(records), "failed": len(errors)}
    if errors:
        out["first_error"] = errors[0][:300]
    if not ok:
        return out
    start = min(r["sent"] for r in records)
    end = max(r["times"][-1] for r in ok)
    tokens = sum(len(r["times"]) for r in ok)
    ttft = [r["times"][0] - r["sent"] for r in ok]
    itl = [b - a for r in ok for a, b in zip(r["times"], r["times"][1:], strict=False)]
    out.update({
        "output_tok_s": round(tokens / max(end - start, 1e-9), 2),
        "ttft_p50_s": _r(percentile(ttft, 0.5)), "ttft_p99_s": _r(percentile(ttft, 0.99)),
        "itl_p50_s": _r(percentile(itl, 0.5)), "itl_p99_s": _r(percentile(itl, 0.99)),
        "output_tokens": tokens, "duration_s": round(end - start, 3),
    })
    return out


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 5)
