"""Child processes of the local mesh (and of tests): started, watched and stopped by PID.

Children start through exec_child, which arms PR_SET_PDEATHSIG before exec'ing the real program,
so even a SIGKILLed parent leaves no orphan behind; a normal stop sends SIGTERM, waits, then
SIGKILLs what is left. Each child logs to `<log_dir>/<name>.log`; a child restarted within one
run appends to its log after a header line, and `Supervisor.new_run` moves the previous run's
logs aside so a failed start is never read against the last run's lines.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

EXEC_CHILD = [sys.executable, "-m", "services.localmesh.exec_child"]


class StartError(RuntimeError):
    pass


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS): what memory bounds in tests and benchmarks read."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise ProcessLookupError(f"pid {pid} has no resident memory (it exited)")


@dataclass
class Child:
    name: str
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has exited (None while it runs or before it started)."""
        return self.proc.poll() if self.proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Supervisor:
    """Owns a set of children; stop() ends every one it started, in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []

    @property
    def previous_log_dir(self) -> Path:
        return self.log_dir.with_name(self.log_dir.name + ".previous")

    def new_run(self) -> Path | None:
        """Begin a run: the last run's logs move to `<log_dir>.previous` (replacing older ones).
        Returns where they went, or None when there were none."""
        if self.children:
            raise RuntimeError("new_run() must come before the run's first child starts")
        moved = None
        if self.log_dir.is_dir() and any(self.log_dir.iterdir()):
            shutil.rmtree(self.previous_log_dir, ignore_errors=True)
            self.log_dir.rename(self.previous_log_dir)
            moved = self.previous_log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return moved

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", env or {})
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "MESHSERVE_SUPERVISOR_PID": str(os.getpid()), **child.env}
        with open(child.log_path, "ab") as out:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            out.write(f"--- {stamp} starting {name}: {' '.join(argv)}\n".encode())
            out.flush()
            # No preexec_fn (unsafe with gRPC threads); own process group so Ctrl-C reaches only
            # the parent, which then stops children in order.
            child.proc = subprocess.Popen(EXEC_CHILD + argv, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, env=full_env,
                                          process_group=0)
        log.debug("started %s pid %d: %s", name, child.proc.pid, " ".join(argv))
        self.children.append(child)
        return child

    def wait_ready(self, child: Child, check: Callable[[], bool], timeout: float,
                   what: str = "ready") -> None:
        """Poll `check` until it is true; fail fast (with the log tail) if the child exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not child.alive():
                raise StartError(f"{child.name} exited with code {child.returncode} before it "
                                 f"was {what}; last log lines:\n{child.log_tail()}")
            try:
                if check():
                    return
            except Exception:  # noqa: BLE001 - not ready yet
                pass
            time.sleep(0.1)
        raise StartError(f"{child.name} was not {what} within {timeout:.0f}s; "
                         f"last log lines:\n{child.log_tail()}")

    def kill(self, child: Child) -> None:
        """SIGKILL one child (failure tests)."""
        proc = child.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    def stop_child(self, child: Child, timeout: float = 15.0) -> None:
        proc = child.proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing pid %d", child.name, timeout,
                        proc.pid)
            proc.kill()
            proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        for child in reversed(self.children):
            self.stop_child(child, timeout)
