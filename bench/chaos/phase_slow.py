"""Phase 8: clients that stop reading. 100 streams read their first chunk and then nothing, first
as gRPC clients that stop iterating, then as HTTP/2 clients that stop reading their sockets
(bench/chaos/nonreaders.py). The memory of Envoy and of each router must stay bounded (flow
control pauses the generation instead of buffering it), and the other clients' time to first
token must not suffer.

The non-readers ask their own control-plane managed model (`quiet`), so a paused stream holds a
slot of that model's engine, never one the measured readers need: what the comparison shows is
the cost of the unread streams in Envoy, the routers and the machine. The non-readers run in a
process of their own (nonreader_proc.py), as another client would: their client-side cost is not
charged to the measured readers' event loop.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from . import probes, rss
from .config import MODEL, QUIET
from .load import Load, LoadSpec
from .nonreader_proc import ChildNonReaders
from .phase import PhaseContext
from .stats import ttft_between

#: Bounded: Envoy's and each router's RSS stops growing - at most this much growth over the last
#: third of the hold (buffers that fill and stay full level off; unbounded buffering goes on) -
#: and at most this much in all (2 MB per unread stream).
LATE_GROWTH_LIMIT_MB, TOTAL_GROWTH_LIMIT_MB = 5.0, 200.0
#: Safety valve for the shared machine: close the non-readers early past this growth.
ABORT_GROWTH_MB = 1500.0
#: Unaffected: TTFT p99 with the non-readers within this factor of p99 without (plus slack for
#: timer noise on a shared 2-core machine).
TTFT_P99_FACTOR, TTFT_SLACK_S = 2.0, 0.1
LOADGEN = "loadgen"  # this process
JUDGED = ("envoy", "router")  # name prefixes whose memory is judged; servers and loadgen are reported


def _unaffected(without: dict, with_: dict) -> bool:
    if not without["n"] or not with_["n"]:
        return False
    return with_["p99"] <= TTFT_P99_FACTOR * without["p99"] + TTFT_SLACK_S


async def _hold(sampler: rss.RssSampler, t_open: float, until: float) -> str:
    """Keep the non-readers open until `until`, unless a mesh process grows past the valve."""
    while time.monotonic() < until:
        for name in sampler.pids:
            if name != LOADGEN and sampler.growth(name, t_open) > ABORT_GROWTH_MB:  # any mesh process
                return f"closed early after {time.monotonic() - t_open:.1f} s: {name} grew > {ABORT_GROWTH_MB:.0f} MB"
        await asyncio.sleep(0.5)
    return ""


def _memory(ctx: PhaseContext, variant: str, sampler: rss.RssSampler, before: dict[str, float],
            t_open: float, t_close: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    late_from = t_open + (t_close - t_open) * 2 / 3
    for name in sampler.pids:
        early, late = sampler.peak(name, t_open, late_from), sampler.peak(name, late_from, t_close + 1)
        peak = max(x for x in (early, late, before[name]) if x is not None)
        total = round(peak - before[name], 1)
        late_growth = round((late or 0) - (early or late or 0), 1) if late is not None else 0.0
        out[name] = {"before": before[name], "peak_during": peak, "growth_last_third": late_growth}
        if name.startswith(JUDGED):
            ok = late_growth <= LATE_GROWTH_LIMIT_MB and total <= TOTAL_GROWTH_LIMIT_MB
            ctx.criterion(f"{variant}: {name} memory bounded", f"+<= {TOTAL_GROWTH_LIMIT_MB:.0f} MB, "
                          f"+<= {LATE_GROWTH_LIMIT_MB:.0f} MB in the last third",
                          f"+{total} MB, +{late_growth} MB in the last third", ok)
    return out


async def _variant(ctx: PhaseContext, name: str, clients: Any, pids: dict[str, int], readers: Load,
                   without: dict) -> dict[str, Any]:
    """One kind of non-reader: open, hold for the phase's time, close; memory and TTFT.

    TTFT is judged while the streams are held unread; the seconds in which 100 streams open (a
    burst of new requests, whatever their clients do next) are reported beside it."""
    s = ctx.settings
    await clients.start(s.nonreaders)
    before = rss.snapshot(pids)
    bytes_before = await probes.envoy_bytes(ctx.mesh.envoy_admin)
    sampler = rss.RssSampler(pids)
    sampler.start()
    t_open = time.monotonic()
    try:
        first = await clients.open()
        t_held = time.monotonic()
        ctx.event(f"{name}: {s.nonreaders} non-reading streams open ({first} gave their first chunk)")
        aborted = await _hold(sampler, t_open, t_open + s.nonreader_for_s)
        t_close = time.monotonic()
        bytes_held = await probes.envoy_bytes(ctx.mesh.envoy_admin)
        await sampler.stop()
        ended = await clients.close()
    finally:
        await clients.stop()
        await sampler.stop()  # again after a failure half way; a second stop only adds a sample
    ctx.event(f"{name}: non-readers closed{' - ' + aborted if aborted else ''} (ended by the mesh "
              f"before that: {ended or 'none'})")
    await asyncio.sleep(s.nonreader_after_s)
    after = rss.snapshot(pids)
    memory = _memory(ctx, name, sampler, before, t_open, t_close)
    for proc, mb in after.items():
        memory[proc]["after"] = mb
    with_ = ttft_between(readers.records, t_held, t_close)
    ctx.criterion(f"{name}: other clients' TTFT unaffected (p99 while held unread vs without)",
                  f"<= {TTFT_P99_FACTOR:.0f} x without + {TTFT_SLACK_S} s",
                  f"{with_['p99']} s vs {without['p99']} s", _unaffected(without, with_))
    moved = {k: round((bytes_held[k] - bytes_before[k]) / 1e6, 1) for k in bytes_before}
    return {"opened": s.nonreaders, "first_chunk": first, "held_s": round(t_close - t_open, 1),
            "envoy_mb_while_held": moved,
            "aborted": aborted, "ended_by_mesh": ", ".join(f"{k}: {v}" for k, v in ended.items()) or "none",
            "rss_mb": memory, "ttft_with_s": with_,
            "ttft_opening_s": ttft_between(readers.records, t_open, t_held),
            "ttft_after_s": ttft_between(readers.records, t_close, time.monotonic())}


async def nonreaders(ctx: PhaseContext) -> None:
    s, mesh = ctx.settings, ctx.mesh
    pids = {name: mesh.children[name].pid or 0
            for name in ("envoy", *(f"router{i}" for i in range(len(mesh.routers))), *mesh.servers)}
    pids[LOADGEN] = os.getpid()
    readers = ctx.start_load(LoadSpec(MODEL, s.concurrency, s.ttft_tokens, timeout_s=s.request_timeout_s,
                                      stagger_s=s.answer_s(s.ttft_tokens)), "p8")
    t_base = time.monotonic()
    await asyncio.sleep(s.nonreader_baseline_s)
    without = ttft_between(readers.records, t_base, time.monotonic())
    ctx.figures["ttft_without_nonreaders_s"] = without
    timeout = s.nonreader_for_s + 60
    variants = {kind: ChildNonReaders(kind, mesh.envoy, QUIET, s.nonreader_tokens, timeout)
                for kind in ("grpc", "raw_http2")}
    ctx.figures["variants"] = {}
    for name, clients in variants.items():
        ctx.figures["variants"][name] = await _variant(ctx, name, clients, pids, readers, without)
