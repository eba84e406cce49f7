"""Cancel a stream whose caller stopped reading.

With bounded HTTP/2 windows a write blocks once the caller stops reading, and the generation
pauses behind it. A caller that never reads again would hold an engine slot and KV blocks
forever, so a write that stays blocked past `limit_s` ends the call. One timer per call, re-armed
lazily (not one per write): token streams write hundreds of times per second.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc


class SlowConsumerGuard:
    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.fired = False
        self._pending_since: float | None = None
        self._task = asyncio.current_task()
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None

    async def write(self, context: Any, message: Any) -> bool:
        """Write one message; False when the caller read nothing for `limit_s` (the write was
        abandoned and the call should end)."""
        self._pending_since = time.monotonic()
        if self._handle is None:
            self._handle = self._loop.call_later(self.limit_s, self._check)
        try:
            await context.write(message)
        except asyncio.CancelledError:
            task = self._task
            if self.fired and task is not None and task.cancelling() <= 1:
                task.uncancel()
                return False
            raise
        except grpc.aio.InternalError:
            # The call ended under a pending write (the caller went away; gRPC reports the write's
            # batch as failed): a cancellation, not a fault of ours.
            raise asyncio.CancelledError from None
        finally:
            self._pending_since = None
        return True

    def _check(self) -> None:
        self._handle = None
        since = self._pending_since
        if since is None:
            return  # idle between writes: the next write re-arms the timer
        left = since + self.limit_s - time.monotonic()
        if left > 0:
            self._handle = self._loop.call_later(left, self._check)
            return
        self.fired = True
        if self._task is not None:
            self._task.cancel()

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
