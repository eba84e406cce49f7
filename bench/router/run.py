"""`python -m bench.router.run [overhead|mtls|multiturn|failover ...]`: run the router benchmarks
(all by default), merging each into bench/results/router.json and router.md."""

from __future__ import annotations

import sys

from . import failover, mtls, multiturn, overhead
from .common import RESULTS, progress, save


def main(argv: list[str]) -> int:
    chosen = argv or ["overhead", "mtls", "failover", "multiturn"]
    for name in chosen:
        if name == "overhead":
            r = overhead.run()
            save("overhead", r["overhead"])
            save("max_rps_one_router", r["max_rps_one_router"])
            save("max_rps_steps", r["max_rps_steps"])
            save("overhead_conditions", r["overhead_conditions"])
        elif name == "mtls":
            save("mtls_overhead", mtls.run())
        elif name == "failover":
            save("failover", failover.run())
        elif name == "multiturn":
            save("multiturn", multiturn.run())
        else:
            print(f"unknown benchmark {name!r}: overhead, mtls, multiturn, failover", file=sys.stderr)
            return 2
    progress(f"results in {RESULTS / 'router.json'} and {RESULTS / 'router.md'}")
    print((RESULTS / "router.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
