"""One log format for every MeshServe process, so the local mesh's interleaved output is readable."""

from __future__ import annotations

import logging
import os
import sys


def setup_logging(component: str, level: str | None = None) -> None:
    level = (level or os.environ.get("MESHSERVE_LOG_LEVEL") or "INFO").upper()
    logging.basicConfig(
        level=level, stream=sys.stderr, force=True,
        format=f"%(asctime)s %(levelname).1s {component} %(name)s: %(message)s")
    for noisy in ("grpc", "aetcd"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
