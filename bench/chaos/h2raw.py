"""A minimal HTTP/2 client, spoken by hand, for a client that stops reading its socket.

No client library: a library would keep draining the socket into its own memory. This one opens
one connection, grants the server the largest windows HTTP/2 allows (so only TCP and the server's
own flow control can hold bytes back), sends gRPC requests on many streams, reads until each
stream has had its first DATA frame, and then never reads again. Only what that needs is here:
frames, HPACK literals without indexing, SETTINGS / PING acks, and send windows.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

# Frame types and flags (RFC 9113).
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7, 0x8
END_STREAM, ACK, END_HEADERS = 0x1, 0x1, 0x4
SETTINGS_INITIAL_WINDOW_SIZE = 0x4
MAX_WINDOW = 2**31 - 1
DEFAULT_WINDOW = 65_535
MAX_FRAME = 16_384
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: A small fixed receive buffer (no autotuning): the kernel holds little for a client that reads nothing.
RCVBUF = 64 * 1024
MAX_FRAMES = 1_000_000  # bound on any read loop


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_int(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (a string literal's length, no Huffman)."""
    if value < 127:
        return bytes([value])
    out = [127]
    value -= 127
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    return bytes([*out, value])


def grpc_headers(path: str, authority: str) -> bytes:
    """HPACK block: every field a literal without indexing, so no table state is needed."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", authority),
              ("content-type", "application/grpc"), ("te", "trailers")]
    return b"".join(b"\x00" + _hpack_int(len(n)) + n.encode() + _hpack_int(len(v)) + v.encode()
                    for n, v in fields)


class RawH2Client:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.send_window = DEFAULT_WINDOW  # connection-level, towards the server
        self.peer_settings = False
        self.got_data: set[int] = set()
        self.ended: dict[int, str] = {}  # stream -> how the server ended it while we read

    @classmethod
    async def connect(cls, address: str) -> RawH2Client:
        host, _, port = address.rpartition(":")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        # A small asyncio buffer too: once we stop reading, asyncio stops reading the socket.
        reader, writer = await asyncio.open_connection(sock=sock, limit=16 * 1024)
        client = cls(reader, writer)
        writer.write(PREFACE + frame(SETTINGS, 0, 0, struct.pack(">HI", SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW))
                     + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - DEFAULT_WINDOW)))
        await writer.drain()
        return client

    async def _read_one(self) -> None:
        head = await self.reader.readexactly(9)
        length, kind, flags = int.from_bytes(head[:3], "big"), head[3], head[4]
        stream = int.from_bytes(head[5:9], "big") & 0x7FFF_FFFF
        payload = await self.reader.readexactly(length)
        if kind == SETTINGS and not flags & ACK:
            self.peer_settings = True
            self.writer.write(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            self.writer.write(frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE and stream == 0:
            self.send_window += int.from_bytes(payload[:4], "big") & 0x7FFF_FFFF
        elif kind == DATA and length:
            self.got_data.add(stream)
        if kind == RST_STREAM or (kind in (HEADERS, DATA) and flags & END_STREAM):
            self.ended[stream] = "RST_STREAM" if kind == RST_STREAM else "ended"
        elif kind == GOAWAY:
            self.ended[0] = "GOAWAY"

    async def send(self, path: str, authority: str, messages: list[bytes]) -> list[int]:
        """One gRPC request per message, each on its own stream (ids 1, 3, 5, ...), within the
        server's connection window (each message must fit one frame and its stream window)."""
        for _ in range(MAX_FRAMES):
            if self.peer_settings:
                break
            await self._read_one()
        streams = []
        for k, message in enumerate(messages):
            body = b"\x00" + struct.pack(">I", len(message)) + message
            if len(body) > min(MAX_FRAME, DEFAULT_WINDOW):
                raise ValueError(f"request of {len(body)} bytes does not fit one frame")
            for _ in range(MAX_FRAMES):
                if self.send_window >= len(body):
                    break
                await self._read_one()
            stream = 2 * k + 1
            self.writer.write(frame(HEADERS, END_HEADERS, stream, grpc_headers(path, authority))
                              + frame(DATA, END_STREAM, stream, body))
            self.send_window -= len(body)
            streams.append(stream)
        await self.writer.drain()
        return streams

    async def read_until_first_data(self, streams: list[int]) -> int:
        """Read until every stream had a DATA frame or ended; how many had DATA."""
        for _ in range(MAX_FRAMES):
            if 0 in self.ended or all(s in self.got_data or s in self.ended for s in streams):
                break
            await self._read_one()
        return sum(1 for s in streams if s in self.got_data)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
