"""`make bench-traffic`: python -m bench.traffic.run [--quick] [--phases canary,fallback,ensemble]."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from . import canary, ensemble, fallback, report

PHASES = {"canary": canary.run, "fallback": fallback.run, "ensemble": ensemble.run}
OUT = Path(__file__).resolve().parents[1] / "results"


async def main(phases: list[str], quick: bool) -> dict:
    results: dict = {"quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                     "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-traffic-") as tmp:
        for name in phases:
            logging.info("phase %s", name)
            try:
                results[name] = await PHASES[name](Path(tmp) / name, quick)
            except Exception as exc:
                logging.exception("phase %s failed", name)
                results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
    results["seconds"] = time.monotonic() - t0
    results["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    return results


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases (checks the harness)")
    parser.add_argument("--phases", default=",".join(PHASES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    phases = [p for p in args.phases.split(",") if p]
    results = asyncio.run(main(phases, args.quick))
    name = "traffic" if not args.quick and phases == list(PHASES) else "traffic-partial"
    report.write(results, OUT, name)
    print((OUT / f"{name}.md").read_text())


if __name__ == "__main__":
    cli()
