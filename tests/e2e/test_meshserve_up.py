"""`meshserve up` as a user runs it: prints endpoints, answers, and leaves no process behind."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import REPO, wait_for

pytestmark = pytest.mark.e2e


def _children_of(pid: int) -> set[int]:
    """Every descendant of pid, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - found
        found |= frontier
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and ") Z" not in stat.read_text()


class _Output:
    def __init__(self, proc: subprocess.Popen) -> None:
        self.text = ""
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None  # started with stdout=PIPE
        for line in proc.stdout:
            self.text += line


def test_up_answers_then_ctrl_c_leaves_no_orphans(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli.meshserve", "up", "--demo", "--base-port", "0",
         "--data-dir", str(tmp_path / "mesh"), "--model", "echo=sim",
         "--engine-option", "tokens_per_second=1000"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = _Output(proc)
    descendants: set[int] = set()
    try:
        wait_for(lambda: "Demo:" in out.text and "usage:" in out.text, 120,
                 "the demo answer", interval=0.2)
        assert re.search(r"client -> Envoy \S+ -> router router0 -> model server server-\d", out.text)
        assert "A: What is the capital of France?" in out.text  # the sim engine echoes
        descendants = _children_of(proc.pid)
        assert len(descendants) >= 6, out.text  # etcd, envoy, control plane, router, 2 servers
        proc.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the foreground process
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in _children_of(proc.pid) | descendants:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    assert proc.returncode == 0, out.text
    assert "no MeshServe process is left running" in out.text
    survivors = [pid for pid in descendants if _alive(pid)]
    assert not survivors, f"processes left behind: {survivors}"


def test_up_refuses_a_taken_port(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "services.cli.meshserve", "up", "--base-port", str(port),
             "--data-dir", str(tmp_path / "mesh")],
            cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert f"envoy ({port})" in result.stderr and "already in use" in result.stderr
    assert not (tmp_path / "mesh" / "etcd0").exists()  # nothing was started
