"""`make bench-cache`: python -m bench.cache.run [--quick] [--phases cross_server,routing].

Writes bench/results/cache.{json,md} (a partial or quick run: cache-partial.*)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from pathlib import Path

from ..phases import run_phases
from . import cross_server, report, routing

PHASES = {"cross_server": cross_server.run, "routing": routing.run}
OUT = Path(__file__).resolve().parents[1] / "results"


async def main(phases: list[str], quick: bool) -> dict:
    return await run_phases(PHASES, phases, quick, "bench-cache-")


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
