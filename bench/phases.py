"""Run a benchmark's phases one after another in a temporary folder, each with the load average
before and after it (these machines are shared: the figures say how noisy their run was); a phase
that fails is recorded with its reason and the others still run."""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

Phase = Callable[[Path, bool], Awaitable[dict]]


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


async def run_phases(phases: Mapping[str, Phase], chosen: list[str], quick: bool, prefix: str) -> dict:
    results: dict = {"quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "loadavg_before": _loadavg()}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        for name in chosen:
            logging.info("phase %s", name)
            run = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_before": _loadavg()}
            try:
                results[name] = await phases[name](Path(tmp) / name, quick)
            except Exception as exc:
                logging.exception("phase %s failed", name)
                results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
            run["loadavg_after"] = _loadavg()
            results[name]["run"] = run
    results["seconds"] = time.monotonic() - t0
    results["loadavg_after"] = _loadavg()
    return results
