"""The phase runner: load on, fault, mesh whole again, load off, judge.

Each phase body injects its fault and adds its own figures and criteria; the runner adds the
criteria every phase shares (issue 8: 0 failed requests, 0 lost or duplicated tokens, 0 requests
without a final status), the load average at its start and end, and makes the mesh whole before
the next phase. A body that raises is recorded as a failed phase with its reason; the run goes on.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.localmesh.mesh import LocalMesh

from .config import MODEL, Settings
from .load import Load, LoadSpec
from .meshsetup import repair, restore
from .record import Record
from .stats import summarize

TICK_S = 5.0


def progress(msg: str) -> None:
    print(f"[chaos {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass
class PhaseContext:
    number: int
    mesh: LocalMesh
    stub: Any  # InferenceServiceStub on a grpc.aio channel to Envoy
    settings: Settings
    t0: float = field(default_factory=time.monotonic)
    loads: list[Load] = field(default_factory=list)
    extra_records: list[Record] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)
    criteria: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)

    def event(self, text: str) -> None:
        t = round(time.monotonic() - self.t0, 2)
        self.events.append((t, text))
        progress(f"phase {self.number} +{t:.1f}s: {text}")

    def criterion(self, name: str, target: str, value: Any, met: bool) -> None:
        self.criteria.append({"name": name, "target": target, "value": value, "met": bool(met)})

    def start_load(self, spec: LoadSpec, tag: str) -> Load:
        load = Load(self.stub, spec, tag)
        load.start()
        self.loads.append(load)
        return load

    def streams(self, tokens: int, tag: str = "") -> Load:
        """The standard load: `concurrency` streams of the pinned sim model."""
        s = self.settings
        return self.start_load(LoadSpec(MODEL, s.concurrency, tokens, timeout_s=s.request_timeout_s,
                                        stagger_s=s.answer_s(tokens)), tag or f"p{self.number}")

    def records(self) -> list[Record]:
        return [r for load in self.loads for r in load.records] + self.extra_records

    async def sleep_until(self, t_rel: float) -> None:
        """Sleep until t_rel seconds after the phase started."""
        await asyncio.sleep(max(0.0, self.t0 + t_rel - time.monotonic()))


async def _ticker(ctx: PhaseContext) -> None:
    while True:
        await asyncio.sleep(TICK_S)
        recs = ctx.records()
        progress(f"phase {ctx.number} +{time.monotonic() - ctx.t0:.0f}s: {len(recs)} requests, "
                 f"{sum(r.ended_at is None for r in recs)} in flight, "
                 f"{sum(r.error is not None for r in recs)} failed, "
                 f"{sum(r.resumes for r in recs)} client resumes")


def _shared_criteria(ctx: PhaseContext, summary: dict) -> None:
    ctx.criterion("failed requests", "0", summary["failed"], summary["failed"] == 0)
    lost, dup, reord = summary["lost_tokens"], summary["duplicated_tokens"], summary["reordered_tokens"]
    ctx.criterion("lost / duplicated / reordered tokens", "0 / 0 / 0", f"{lost} / {dup} / {reord}",
                  lost == dup == reord == 0 and summary["foreign_tokens"] == 0)
    ctx.criterion("requests without a final status", "0", summary["no_final_status"],
                  summary["no_final_status"] == 0)
    ctx.criterion("finished answers exact (text, ids, usage)", "0 inexact", summary["inexact_answers"],
                  summary["inexact_answers"] == 0)


async def run_phase(ctx: PhaseContext, name: str, title: str,
                    body: Callable[[PhaseContext], Awaitable[None]]) -> dict[str, Any]:
    s = ctx.settings
    load_start = os.getloadavg()
    progress(f"phase {ctx.number} ({name}): {title}")
    ticker = asyncio.create_task(_ticker(ctx))
    harness_error = None
    try:
        await body(ctx)
    except Exception as exc:  # noqa: BLE001 - a broken phase is reported, the run goes on
        harness_error = f"{type(exc).__name__}: {exc}"
        progress(f"phase {ctx.number}: ERROR {harness_error}\n{traceback.format_exc()}")
    finally:
        cut = 0
        for load in ctx.loads:
            cut += await load.stop(s.grace_s)
        ticker.cancel()
    summary = summarize(ctx.records())
    summary["cut_off_after_grace"] = cut
    _shared_criteria(ctx, summary)
    if harness_error:
        ctx.criterion("phase ran to its end", "no error", harness_error, False)
    repaired = await repair(ctx.mesh)
    restored_s, not_restored = await restore(ctx.mesh, ctx.stub, s.restore_timeout_s)
    if not_restored:
        progress(f"phase {ctx.number}: mesh NOT whole after {s.restore_timeout_s:.0f}s: {not_restored}")
    result = {
        "phase": ctx.number, "name": name, "title": title,
        "passed": all(c["met"] for c in ctx.criteria), "criteria": ctx.criteria,
        "figures": ctx.figures, "requests": summary, "events": ctx.events,
        "harness_error": harness_error, "repaired_after": repaired,
        "restored_within_s": restored_s, "not_restored": not_restored,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "seconds": round(time.monotonic() - ctx.t0, 1),
    }
    _print_result(result)
    return result


def _print_result(r: dict[str, Any]) -> None:
    q = r["requests"]
    progress(f"phase {r['phase']} ({r['name']}): {'PASSED' if r['passed'] else 'FAILED'} - "
             f"{q['requests']} requests, {q['failed']} failed, {q['no_final_status']} without final "
             f"status, lost/dup/reordered {q['lost_tokens']}/{q['duplicated_tokens']}/"
             f"{q['reordered_tokens']}, {q['client_resumes']} client resumes; load avg "
             f"{r['loadavg_start'][0]} -> {r['loadavg_end'][0]}")
    for c in r["criteria"]:
        progress(f"  [{'ok' if c['met'] else 'NOT MET'}] {c['name']}: {c['value']} (target {c['target']})")
    for f in q["failure_reasons"]:
        progress(f"  failed {f['request_id']}: {f['status']}: {f['message']}")
