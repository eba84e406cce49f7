"""Stopping background tasks for sure.

On Python 3.11 `asyncio.wait_for` returns the inner result, dropping a cancel, when both land in
the same loop turn (fixed in 3.12). A poll loop built on it can survive `task.cancel()` and a plain
`await task` then waits for ever: seen as a hung engine stop in CI. `stop_tasks` cancels again
until the task ends, and gives up (logged) after a bound instead of hanging a shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

log = logging.getLogger(__name__)


async def stop_tasks(tasks: Iterable[asyncio.Task | None], *, grace_s: float = 5.0,
                     recancel_s: float = 0.25) -> list[asyncio.Task]:
    """Cancel `tasks` and wait until they end, cancelling again every `recancel_s` while any keeps
    running (a task that cleans up in `finally` gets that long per round).

    Returns the tasks still running after `grace_s` (normally none); they are left to the loop."""
    given = [t for t in tasks if t is not None]
    pending = {t for t in given if not t.done()}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    while pending:
        for t in pending:
            t.cancel()
        left = deadline - loop.time()
        if left <= 0:
            log.error("%d task(s) did not stop within %.1f s of cancel: %s", len(pending), grace_s,
                      ", ".join(sorted(t.get_name() for t in pending)))
            return list(pending)
        _, pending = await asyncio.wait(pending, timeout=min(recancel_s, left))
    for t in given:
        if not t.cancelled():
            with contextlib.suppress(Exception):
                t.result()  # retrieved: no "exception was never retrieved" at exit
    return []


async def stop_task(task: asyncio.Task | None, *, grace_s: float = 5.0) -> None:
    """`stop_tasks` for one task."""
    await stop_tasks([task], grace_s=grace_s)
