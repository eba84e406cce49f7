"""Non-reading clients in a process of their own.

Another client's stalled streams cost its own process memory and CPU (the gRPC library drains its
socket into the application's memory); in the load generator's process that cost would land on
the measured readers' event loop and be blamed on the mesh. So the non-readers run here, on their
own connection to Envoy, and the phase talks to this process over stdin/stdout:

    python -m bench.chaos.nonreader_proc KIND ENVOY MODEL N TOKENS TIMEOUT_S
    -> {"ready": true}       imports done (a process start costs a second of CPU: not in the window)
    <- any line              open the n streams
    -> {"first": k}          once they are open (k gave their first chunk)
    <- any line (or EOF)     close them
    -> {"ended": {...}}      streams the mesh had ended before, by status; then it exits
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import grpc
from meshserve.v1 import inference_pb2_grpc

from .nonreaders import GrpcNonReaders, RawNonReaders


async def _serve(kind: str, envoy: str, model: str, n: int, tokens: int, timeout: float) -> None:
    channel = grpc.aio.insecure_channel(envoy)
    clients: Any
    if kind == "grpc":
        clients = GrpcNonReaders(inference_pb2_grpc.InferenceServiceStub(channel), model, tokens, timeout)
    else:
        clients = RawNonReaders(envoy, model, tokens)
    try:
        print(json.dumps({"ready": True}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        first = await clients.open(n)
        print(json.dumps({"first": first}), flush=True)
        await asyncio.to_thread(sys.stdin.readline)  # the phase says close (or went away)
        ended = await clients.close()
        print(json.dumps({"ended": ended}), flush=True)
    finally:
        await channel.close(grace=None)


class ChildNonReaders:
    """The phase's handle on a `nonreader_proc` child: same open/close as the in-process kinds."""

    def __init__(self, kind: str, envoy: str, model: str, tokens: int, timeout: float) -> None:
        self.args = [kind, envoy, model, "0", str(tokens), str(timeout)]
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    async def start(self, n: int) -> None:
        """Start the process with its imports done, ready to open n streams."""
        self.args[3] = str(n)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.chaos.nonreader_proc", *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        await self._reply("ready")

    async def open(self) -> int:
        """Open the streams; how many gave their first chunk."""
        await self._say("open")
        return int((await self._reply("first")) or 0)

    async def close(self) -> dict[str, int]:
        if self.proc is None:
            return {}
        await self._say("close")
        try:
            return dict(await self._reply("ended") or {})
        finally:
            await self.stop()

    async def stop(self) -> None:
        """Make sure the child is gone (also when the phase failed half way)."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()

    async def _say(self, word: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(word.encode() + b"\n")
        await self.proc.stdin.drain()

    async def _reply(self, key: str) -> Any:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 120)
        if not line:
            raise RuntimeError(f"the non-reader process ended before saying {key!r}")
        return json.loads(line).get(key)


def main(argv: list[str]) -> int:
    kind, envoy, model, n, tokens, timeout = argv
    asyncio.run(_serve(kind, envoy, model, int(n), int(tokens), float(timeout)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
