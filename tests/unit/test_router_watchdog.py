"""The per-attempt watchdog: silence before the first chunk, then between chunks, abandons the
attempt with a cause (so the dispatcher retries or migrates instead of ending silently)."""

import asyncio

from services.router.attempt import Watchdog
from services.router.replica import AttemptHandle
from tests.helpers import until


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> bool:
        self.cancelled = True
        return True


async def test_no_first_chunk_abandons_the_call_with_a_cause():
    handle = AttemptHandle(FakeCall())
    Watchdog(handle, first_s=0.05, stall_s=10)
    await until(lambda: handle.call.cancelled, 2, "the watchdog")
    assert "no token within 0.05s" in handle.cause


async def test_chunks_keep_it_quiet_and_a_later_gap_fires():
    loop = asyncio.get_running_loop()
    handle = AttemptHandle(FakeCall())
    dog = Watchdog(handle, first_s=0.5, stall_s=0.5)
    for _ in range(15):  # chunks every ~50 ms for ~750 ms: longer than either limit in total
        await asyncio.sleep(0.05)
        dog.chunk(loop.time())
        assert not handle.call.cancelled
    await until(lambda: handle.call.cancelled, 2, "the watchdog")  # then silence
    assert "no further token" in handle.cause


async def test_stop_disarms_and_the_first_cause_wins():
    handle = AttemptHandle(FakeCall())
    dog = Watchdog(handle, first_s=0.05, stall_s=0.05)
    dog.stop()
    await asyncio.sleep(0.2)  # well past both limits: a disarmed watchdog stays quiet
    assert not handle.call.cancelled
    handle.abort("its server left the mesh")
    handle.abort("stalled")
    assert handle.cause == "its server left the mesh"


async def test_time_waiting_for_a_slow_client_is_not_server_silence():
    loop = asyncio.get_running_loop()
    handle = AttemptHandle(FakeCall())
    dog = Watchdog(handle, first_s=0.1, stall_s=0.1)
    dog.chunk(loop.time())
    dog.hold()  # the relay blocks handing the chunk to a client that stopped reading
    await asyncio.sleep(0.5)  # five stall limits
    assert not handle.call.cancelled
    dog.chunk(loop.time())  # the client took it: the server's silence counts from here
    await until(lambda: handle.call.cancelled, 2, "the watchdog after the hand-off")
