"""stop_tasks ends background tasks even when one drops a cancel (Python 3.11's wait_for does when
its inner future completes in the same turn), and never hangs a shutdown on one that will not end."""

from __future__ import annotations

import asyncio
import contextlib

from services.common.tasks import stop_task, stop_tasks


async def _drops_first_cancel(ended: list[str]) -> None:
    with contextlib.suppress(asyncio.CancelledError):  # lost, as in the wait_for race
        await asyncio.sleep(3600)
    try:
        await asyncio.sleep(3600)
    finally:
        ended.append("stopped")


async def _refuses_until(release: asyncio.Event) -> None:
    while not release.is_set():
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            continue


async def _fails() -> None:
    raise RuntimeError("poll failed")


async def test_a_dropped_cancel_is_sent_again():
    ended: list[str] = []
    task = asyncio.create_task(_drops_first_cancel(ended))
    await asyncio.sleep(0)
    assert await stop_tasks([task], recancel_s=0.01) == []
    assert task.cancelled() and ended == ["stopped"]


async def test_a_task_that_refuses_is_given_up_after_the_grace():
    release = asyncio.Event()
    stubborn = asyncio.create_task(_refuses_until(release), name="stubborn")
    quiet = asyncio.create_task(asyncio.sleep(3600))
    await asyncio.sleep(0)
    left = await stop_tasks([stubborn, quiet, None], grace_s=0.1, recancel_s=0.02)
    assert left == [stubborn] and quiet.cancelled()
    release.set()  # the test cleans up what stop_tasks gave up on
    stubborn.cancel()
    await asyncio.wait([stubborn], timeout=5)
    assert stubborn.done()


async def test_failed_and_finished_tasks_do_not_raise():
    failed = asyncio.create_task(_fails())
    done = asyncio.create_task(asyncio.sleep(0))
    await asyncio.sleep(0.01)
    assert await stop_tasks([failed, done]) == []
    await stop_task(None)
