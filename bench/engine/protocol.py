"""The runner side of the harness protocol (stdlib only, imported by every peer's runner).

The harness starts `<venv python> runners/run_X.py '<json config>'`; the runner loads its model and
answers on stdout with lines prefixed by MARK (anything else a library prints is ignored):
{"ready": true, "info": {...}} once, then one {"ok": true, "records": [...]} or {"ok": false,
"error": "..."} per {"cmd": "run", "scenario": {...}} line read from stdin, until {"cmd": "quit"}.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Protocol

MARK = "@@BENCH "


class Runner(Protocol):
    info: dict

    def run(self, scenario: dict) -> list: ...


def emit(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve(load: Callable[[dict], Runner]) -> None:
    """Load once, then run scenarios until told to quit; a failing scenario does not end the runner."""
    config = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}
    try:
        runner = load(config)
    except Exception:  # noqa: BLE001 - reported to the harness, which records why
        emit({"ready": False, "error": traceback.format_exc(limit=4)})
        return
    emit({"ready": True, "info": runner.info})
    for line in sys.stdin:
        msg = json.loads(line)
        if msg.get("cmd") == "quit":
            break
        try:
            records = runner.run(msg["scenario"])
            emit({"ok": True, "records": [r.to_json() for r in records]})
        except Exception:  # noqa: BLE001 - reported to the harness, the runner stays up
            emit({"ok": False, "error": traceback.format_exc(limit=4)})
