"""The per-attempt watchdog: silence before the first chunk, then between chunks."""

import asyncio

from services.router.dispatch import _Watchdog
from tests.helpers import eventually


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


async def test_no_first_chunk_cancels_the_call():
    call = FakeCall()
    dog = _Watchdog(call, first_s=0.05, stall_s=10)
    assert await eventually(lambda: call.cancelled, 2.0)
    assert dog.fired


async def test_chunks_keep_it_quiet_and_a_later_gap_fires():
    loop = asyncio.get_running_loop()
    call = FakeCall()
    dog = _Watchdog(call, first_s=0.5, stall_s=0.5)
    for _ in range(15):  # chunks every ~50 ms for ~750 ms: longer than either limit in total
        await asyncio.sleep(0.05)
        dog.chunk(loop.time())
        assert not call.cancelled
    assert await eventually(lambda: call.cancelled, 2.0)  # then silence
    assert dog.fired


async def test_stop_disarms():
    call = FakeCall()
    dog = _Watchdog(call, first_s=0.05, stall_s=0.05)
    dog.stop()
    assert not await eventually(lambda: call.cancelled, 0.2)
    assert not dog.fired
