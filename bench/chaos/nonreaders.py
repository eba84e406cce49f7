"""Clients that stop reading a streamed answer, two ways.

- `GrpcNonReaders`: grpc.aio streams that read their first chunk and are then left alone. The
  client library keeps draining its socket into its own memory, so this is what an application
  that stops iterating costs the mesh.
- `RawNonReaders`: one HTTP/2 connection carrying every stream, spoken by hand (h2raw.py), that
  reads until each stream's first DATA frame and then never reads its socket again, having granted
  Envoy the largest HTTP/2 windows: only TCP and the mesh's own flow control can hold the bytes
  back, as with a client process that hung. This shows whether Envoy and the routers buffer
  without bound. (One connection: the kernel buffers a few MB per connection, which would hide
  Envoy's behaviour behind 100 connections for minutes.)

Their prompts are made of long words, which the sim engine echoes one per token. The raw client's
are 2 KiB: at 50 tokens/s, 100 streams carry ~10 MB/s, so the connection's kernel buffers fill in
a second and unbounded buffering would show as steady growth over the phase. The gRPC clients,
whose library drains the socket into their own process's memory, use 256-byte words.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from meshserve.v1 import inference_pb2

from .h2raw import RawH2Client

RAW_WORD_BYTES, GRPC_WORD_BYTES, WORDS = 2048, 256, 3
FIRST_CHUNK_TIMEOUT_S = 30.0
METHOD = "/meshserve.v1.InferenceService/GenerateStream"


def request(model: str, i: int, tokens: int, word_bytes: int) -> inference_pb2.GenerateRequest:
    prompt = " ".join(f"{i}-{w}-".ljust(word_bytes, "x") for w in range(WORDS))
    req = inference_pb2.GenerateRequest(model=model, prompt=prompt, request_id=f"nonreader-{i}")
    req.sampling.max_tokens = tokens
    return req


class GrpcNonReaders:
    def __init__(self, stub: Any, model: str, tokens: int, timeout: float) -> None:
        self.stub, self.model, self.tokens, self.timeout = stub, model, tokens, timeout
        self.calls: list[Any] = []

    async def open(self, n: int) -> int:
        """Open n streams, read each one's first chunk; how many gave one."""
        self.calls = [self.stub.GenerateStream(request(self.model, i, self.tokens, GRPC_WORD_BYTES),
                                            timeout=self.timeout)
                      for i in range(n)]

        async def first(call: Any) -> bool:
            try:
                await asyncio.wait_for(call.read(), FIRST_CHUNK_TIMEOUT_S)
                return True
            except (TimeoutError, grpc.aio.AioRpcError):
                return False

        return sum(await asyncio.gather(*(first(c) for c in self.calls)))

    async def close(self) -> dict[str, int]:
        """Cancel every stream; count those the mesh had ended already, by status."""
        ended: dict[str, int] = {}
        for call in self.calls:
            if call.done():
                code = (await call.code()).name
                ended[code] = ended.get(code, 0) + 1
            else:
                call.cancel()
        return ended


class RawNonReaders:
    """n streams on one HTTP/2 connection that stops reading after each stream's first chunk."""

    def __init__(self, envoy: str, model: str, tokens: int) -> None:
        self.envoy, self.model, self.tokens = envoy, model, tokens
        self.client: RawH2Client | None = None

    async def open(self, n: int) -> int:
        self.client = await RawH2Client.connect(self.envoy)
        messages = [request(self.model, i, self.tokens, RAW_WORD_BYTES).SerializeToString() for i in range(n)]
        try:
            streams = await asyncio.wait_for(self.client.send(METHOD, self.envoy, messages), FIRST_CHUNK_TIMEOUT_S)
            return await asyncio.wait_for(self.client.read_until_first_data(streams), FIRST_CHUNK_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            return len(self.client.got_data)

    async def close(self) -> dict[str, int]:
        ended: dict[str, int] = {}
        if self.client is not None:
            for how in self.client.ended.values():
                ended[how] = ended.get(how, 0) + 1
            await self.client.close()
        return ended
