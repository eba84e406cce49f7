"""Exec a child program that dies with its parent: `python -m services.localmesh.exec_child ARGV`.

PR_SET_PDEATHSIG survives execve, so setting it here (then exec'ing) gives etcd, Envoy and the
services a SIGTERM if the supervising process dies, even by SIGKILL. It is done in this tiny
program instead of a Popen preexec_fn because forking a process that has gRPC threads and then
running Python code before exec can deadlock the child.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def main() -> None:
    argv = sys.argv[1:]
    if not argv:
        sys.exit("usage: python -m services.localmesh.exec_child PROGRAM [ARGS...]")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        sys.exit(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}")
    expected = os.environ.get("MESHSERVE_SUPERVISOR_PID")
    if expected and os.getppid() != int(expected):
        sys.exit(0)  # the supervisor died before we armed the signal: do not start orphaned
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main()
