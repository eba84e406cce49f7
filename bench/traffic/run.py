"""`make bench-traffic`: python -m bench.traffic.run [--quick] [--phases canary,fallback,ensemble]."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import tempfile
from pathlib import Path

from ..phases import run_phases
from . import canary, ensemble, fallback, report

PHASES = {"canary": canary.run, "fallback": fallback.run, "ensemble": ensemble.run}
OUT = Path(__file__).resolve().parents[1] / "results"


async def main(phases: list[str], quick: bool) -> dict:
    return await run_phases(PHASES, phases, quick, "bench-traffic-")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short phases (checks the harness)")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--update", action="store_true",
                        help="run these phases again into traffic.{json,md}, keeping the other phases' results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    phases = [p for p in args.phases.split(",") if p]
    results = asyncio.run(main(phases, args.quick))
    raw = Path(tempfile.gettempdir()) / "traffic-last-run.json"  # kept whatever the merge below does
    raw.write_text(json.dumps(results, indent=2, default=str) + "\n")
    name = "traffic" if not args.quick and (phases == list(PHASES) or args.update) else "traffic-partial"
    if args.update and (OUT / f"{name}.json").exists():
        earlier = json.loads((OUT / f"{name}.json").read_text())
        results = {**earlier, **{k: v for k, v in results.items() if k in phases},
                   "updated": {p: results[p]["run"] for p in phases}}
    report.write(results, OUT, name)
    print((OUT / f"{name}.md").read_text())


if __name__ == "__main__":
    cli()
