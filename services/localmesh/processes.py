"""Child processes of the local mesh (and of tests): started, watched and stopped by PID.

Children start through exec_child, which arms PR_SET_PDEATHSIG before exec'ing the real program,
so even a SIGKILLed parent leaves no orphan behind; a normal stop sends SIGTERM, waits, then
SIGKILLs what is left.
"""

from __future__ import annotations

import logging
import os
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

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

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

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        child = Child(name, argv, self.log_dir / f"{name}.log", env or {})
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1",
                    "MESHSERVE_SUPERVISOR_PID": str(os.getpid()), **child.env}
        with open(child.log_path, "ab") as out:
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
        if child.proc is not None and child.alive():
            child.proc.send_signal(signal.SIGKILL)
            child.proc.wait(timeout=10)

    def stop_child(self, child: Child, timeout: float = 15.0) -> None:
        if child.proc is None or not child.alive():
            return
        child.proc.send_signal(signal.SIGTERM)
        try:
            child.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0fs; killing pid %d", child.name, timeout,
                        child.pid)
            child.proc.kill()
            child.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        for child in reversed(self.children):
            self.stop_child(child, timeout)
