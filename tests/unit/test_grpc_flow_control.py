"""gRPC backpressure with the mesh's options: a server-streaming handler's `yield` blocks once
the client stops reading, after a bounded amount of data (the relay in every router depends on
it). With gRPC's default BDP probing the window grows instead and ~5 MB per stream flowed."""

from __future__ import annotations

import asyncio
import time

import grpc

from services.common.grpc_util import CHANNEL_OPTIONS, SERVER_OPTIONS, STREAM_WINDOW_BYTES
from services.common.ports import free_port

CHUNK = b"t" * 200  # about a token chunk with its metadata
TOTAL = 20_000  # 4 MB if nothing held it back


async def _settled(read, interval: float = 0.3, timeout: float = 20.0) -> int:
    """Wait until a counter stops moving (the sender is blocked); returns its value."""
    deadline = time.monotonic() + timeout
    last = -1
    while time.monotonic() < deadline:
        now = read()
        if now == last and now > 0:
            return now
        last = now
        await asyncio.sleep(interval)
    raise AssertionError(f"the sender never blocked (sent {read()} chunks)")


async def test_a_stream_whose_client_stops_reading_blocks_the_handler():
    sent = 0
    done = asyncio.Event()

    async def stream(request: bytes, context: grpc.aio.ServicerContext):
        nonlocal sent
        for _ in range(TOTAL):
            yield CHUNK
            sent += 1
        done.set()

    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "t.Flow", {"Stream": grpc.unary_stream_rpc_method_handler(stream)}),))
    address = f"127.0.0.1:{free_port()}"
    server.add_insecure_port(address)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_stream("/t.Flow/Stream")(b"")
            first = await call.read()  # the call is up; now the client stops reading
            assert first == CHUNK
            blocked_at = await _settled(lambda: sent)
            assert not done.is_set()
            # Bounded by the client's stream window (plus a message or two in flight), far
            # below the 4 MB the handler would have produced.
            assert blocked_at * len(CHUNK) < 4 * STREAM_WINDOW_BYTES, blocked_at
            received = 1
            while await call.read() is not grpc.aio.EOF:  # reading again resumes the handler
                received += 1
            assert received == TOTAL and done.is_set()
    finally:
        await server.stop(None)
