"""`make bench-cache`: python -m bench.cache.run [--quick] [--phases cross_server,routing].

Writes bench/results/cache.{json,md} (a partial or quick run: cache-partial.*)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

from . import cross_server, report, routing

PHASES = {"cross_server": cross_server.run, "routing": routing.run}
OUT = Path(__file__).resolve().parents[1] / "results"


async def main(phases: list[str], quick: bool) -> dict:
    results: dict = {"quick": quick, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                     "loadavg_before": [round(x, 2) for x in os.getloadavg()]}
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as tmp:
        for name in phases:
            logging.info("phase %s", name)
            run = {"loadavg_before": [round(x, 2) for x in os.getloadavg()]}
            try:
                results[name] = await PHASES[name](Path(tmp) / name, quick)
            except Exception as exc:  # a failed phase is recorded, the other runs
                logging.exception("phase %s failed", name)
                results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
            run["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
            results[name]["run"] = run
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
    (Path(tempfile.gettempdir()) / "cache-last-run.json").write_text(json.dumps(results, indent=2, default=str))
    name = "cache" if not args.quick and phases == list(PHASES) else "cache-partial"
    report.write(results, OUT, name)


if __name__ == "__main__":
    cli()
