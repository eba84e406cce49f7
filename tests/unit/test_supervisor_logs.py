"""Run logs: a new run moves the last run's logs aside; a restart within a run appends."""

from __future__ import annotations

import sys

from services.localmesh.processes import Supervisor


def _say(sup: Supervisor, name: str, text: str) -> None:
    child = sup.start(name, [sys.executable, "-c", f"print({text!r})"])
    assert child.proc is not None
    child.proc.wait(timeout=30)


def test_new_run_keeps_the_previous_runs_logs_apart(tmp_path):
    logs = tmp_path / "logs"
    first = Supervisor(logs)
    assert first.new_run() is None  # nothing to move on a fresh data dir
    _say(first, "router0", "run one")
    _say(first, "router0", "run one, restarted")

    second = Supervisor(logs)
    assert second.new_run() == tmp_path / "logs.previous"
    _say(second, "router0", "run two")

    previous = (tmp_path / "logs.previous" / "router0.log").read_text()
    assert "run one\n" in previous and "run one, restarted" in previous
    assert previous.count("starting router0") == 2  # the restart appended after a header
    current = (logs / "router0.log").read_text()
    assert "run two" in current and "run one" not in current

    third = Supervisor(logs)
    third.new_run()
    assert "run two" in (tmp_path / "logs.previous" / "router0.log").read_text()
