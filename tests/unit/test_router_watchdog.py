"""The per-attempt watchdog: silence before the first chunk, then between chunks."""

import asyncio

from services.router.dispatch import _Watchdog


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def _until(check, limit=2.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while not check() and loop.time() < deadline:
        await asyncio.sleep(0.005)
    return check()


def test_no_first_chunk_cancels_the_call():
    async def go():
        call = FakeCall()
        dog = _Watchdog(call, first_s=0.05, stall_s=10)
        assert await _until(lambda: call.cancelled)
        assert dog.fired
    asyncio.run(go())


def test_chunks_keep_it_quiet_and_a_later_gap_fires():
    async def go():
        loop = asyncio.get_running_loop()
        call = FakeCall()
        dog = _Watchdog(call, first_s=0.5, stall_s=0.5)
        for _ in range(15):  # chunks every ~50 ms for ~750 ms: longer than either limit in total
            await asyncio.sleep(0.05)
            dog.chunk(loop.time())
            assert not call.cancelled
        assert await _until(lambda: call.cancelled)  # then silence
        assert dog.fired
    asyncio.run(go())


def test_stop_disarms():
    async def go():
        call = FakeCall()
        dog = _Watchdog(call, first_s=0.05, stall_s=0.05)
        dog.stop()
        assert not await _until(lambda: call.cancelled, limit=0.2)
        assert not dog.fired
    asyncio.run(go())
