"""A stream whose caller stops reading pauses behind bounded windows, and is let go after the
limit; a caller that cancels under a pending write is a cancellation, never an internal error."""

from __future__ import annotations

import asyncio

import grpc
from meshserve.v1 import modelserver_pb2 as pb
from meshserve.v1 import modelserver_pb2_grpc as pbg

from services.common.errors import ResourceExhausted
from services.common.grpc_util import CHANNEL_OPTIONS, new_server
from services.common.slow_consumer import SlowConsumerGuard
from tests.helpers import until

CHUNK = pb.ModelServerServiceGenerateResponse(text="x" * 200, token_ids=[1])


class Writer(pbg.ModelServerServiceServicer):
    def __init__(self, limit_s: float) -> None:
        self.limit_s = limit_s
        self.ended: list[str] = []

    async def Generate(self, request, context) -> None:
        guard = SlowConsumerGuard(self.limit_s)
        try:
            for _ in range(1_000_000):
                if not await guard.write(context, CHUNK):
                    self.ended.append("slow")
                    raise ResourceExhausted("the caller read nothing; let go")
        except ResourceExhausted:
            raise
        except asyncio.CancelledError:
            self.ended.append("cancelled")
            raise
        except Exception as exc:
            self.ended.append(type(exc).__name__)
            raise
        finally:
            guard.close()


async def serve(servicer: Writer) -> tuple[grpc.aio.Server, str]:
    server, _ = new_server(["meshserve.v1.ModelServerService"])
    pbg.add_ModelServerServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


async def test_a_caller_that_stops_reading_is_let_go_after_the_limit():
    servicer = Writer(limit_s=0.5)
    server, address = await serve(servicer)
    try:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            call = pbg.ModelServerServiceStub(channel).Generate(pb.ModelServerServiceGenerateRequest())
            await call.read()  # one chunk, then nothing: the windows fill and the writes block
            await until(lambda: servicer.ended, 10, "the server to give up on the caller")
            assert servicer.ended == ["slow"]
            call.cancel()
    finally:
        await server.stop(0)


async def test_a_caller_cancelling_under_a_pending_write_is_a_cancellation():
    servicer = Writer(limit_s=60)
    server, address = await serve(servicer)
    try:
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            call = pbg.ModelServerServiceStub(channel).Generate(pb.ModelServerServiceGenerateRequest())
            await call.read()
            await asyncio.sleep(0.3)  # long enough for the windows to fill and a write to block
            call.cancel()
            await until(lambda: servicer.ended, 10, "the server to see the caller go")
            assert servicer.ended == ["cancelled"]
    finally:
        await server.stop(0)
