"""The HTTP/1.1 request reader and RFC 6455 WebSocket server framing the streaming server
speaks.

Small on purpose: one GET request per connection (the streaming URLs are single use), the
upgrade handshake, and messages made of frames — fragmented messages are joined, pings
answered, a close echoed. Frames from the client must be masked (RFC 6455 §5.1) and are
unmasked here; the server's own frames are never masked. Messages are limited in size so
one client cannot make the daemon buffer without bound.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import struct
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

__all__ = [
    "BINARY",
    "CLOSE",
    "MAX_MESSAGE",
    "TEXT",
    "HTTPRequest",
    "ProtocolError",
    "WebSocket",
    "accept_key",
    "read_request",
    "send_response",
]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONTINUATION, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
MAX_MESSAGE = 16 << 20
MAX_HEADER = 64 << 10


class ProtocolError(Exception):
    """The peer broke HTTP or WebSocket framing; the connection is dropped."""


@dataclass(slots=True)
class HTTPRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str] = field(default_factory=dict)  # lower-cased names

    def header_list(self, name: str) -> list[str]:
        """A comma-separated header's items, stripped (``Sec-WebSocket-Protocol``)."""
        return [v.strip() for v in self.headers.get(name, "").split(",") if v.strip()]

    @property
    def is_websocket(self) -> bool:
        return self.headers.get("upgrade", "").lower() == "websocket" and "upgrade" in [
            v.lower() for v in self.header_list("connection")
        ]


async def read_request(reader: asyncio.StreamReader) -> HTTPRequest:
    """Read one request head (no body: the streaming endpoints take none)."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError("request head too large") from exc
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("connection closed before the request head ended") from exc
    if len(head) > MAX_HEADER:
        raise ProtocolError("request head too large")
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ProtocolError(f"bad request line {lines[0]!r}")
    url = urlsplit(parts[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise ProtocolError(f"bad header line {line!r}")
        key = name.strip().lower()
        # Repeated headers fold into one comma-separated value (RFC 9110 §5.3).
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    return HTTPRequest(parts[0], url.path, parse_qs(url.query), headers)


async def send_response(writer: asyncio.StreamWriter, code: int, reason: str, body: str) -> None:
    """A plain-text answer, then the connection is closed."""
    data = body.encode()
    writer.write(
        f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def accept_key(key: str) -> str:
    """``Sec-WebSocket-Accept`` for the client's ``Sec-WebSocket-Key``."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def encode_frame(opcode: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One final frame; ``mask`` (4 bytes) only for a client's frames."""
    n = len(payload)
    head = bytearray([0x80 | opcode])
    bit = 0x80 if mask else 0
    if n < 126:
        head.append(bit | n)
    elif n < 1 << 16:
        head.append(bit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(bit | 127)
        head += struct.pack("!Q", n)
    if mask:
        head += mask
        payload = _unmask(payload, mask)
    return bytes(head) + payload


def _unmask(data: bytes, mask: bytes) -> bytes:
    # XOR with the 4-byte key repeated, done on big ints: far faster than a byte loop.
    n = len(data)
    if n == 0:
        return data
    key = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


class WebSocket:
    """A server-side WebSocket over an upgraded connection."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False
        self._lock = asyncio.Lock()

    @classmethod
    async def accept(
        cls,
        req: HTTPRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        protocol: str,
    ) -> WebSocket:
        """Answer the upgrade (101) selecting ``protocol`` (empty: none)."""
        key = req.headers.get("sec-websocket-key", "")
        if not key or req.headers.get("sec-websocket-version") != "13":
            raise ProtocolError("not a version 13 WebSocket handshake")
        lines = [
            "HTTP/1.1 101 Switching Protocols",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Accept: {accept_key(key)}",
        ]
        if protocol:
            lines.append(f"Sec-WebSocket-Protocol: {protocol}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        await writer.drain()
        return cls(reader, writer)

    async def _frame(self) -> tuple[bool, int, bytes]:
        b0, b1 = await self.reader.readexactly(2)
        if b0 & 0x70:
            raise ProtocolError("reserved bits set (no extension was negotiated)")
        n = b1 & 0x7F
        if n == 126:
            (n,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", await self.reader.readexactly(8))
        if n > MAX_MESSAGE:
            raise ProtocolError(f"frame of {n} bytes is too large")
        mask = await self.reader.readexactly(4) if b1 & 0x80 else b""
        payload = await self.reader.readexactly(n)
        if mask:
            payload = _unmask(payload, mask)
        return bool(b0 & 0x80), b0 & 0x0F, payload

    async def recv(self) -> tuple[int, bytes] | None:
        """The next data message as (opcode, payload); None once the peer has gone."""
        if self.closed:
            return None
        parts: list[bytes] = []
        opcode = 0
        try:
            while True:
                fin, op, payload = await self._frame()
                if op == PING:
                    await self.send(payload, PONG)
                elif op == PONG:
                    pass
                elif op == CLOSE:
                    await self.close(1000)
                    return None
                else:
                    if op != CONTINUATION:
                        opcode = op
                    parts.append(payload)
                    if sum(map(len, parts)) > MAX_MESSAGE:
                        raise ProtocolError("message too large")
                    if fin:
                        return opcode, b"".join(parts)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed = True
            return None

    async def send(self, payload: bytes, opcode: int = BINARY) -> None:
        """Send one message; raises ConnectionError once the connection is closed."""
        async with self._lock:
            if self.closed and opcode != CLOSE:
                raise ConnectionResetError("websocket is closed")
            self.writer.write(encode_frame(opcode, payload))
            await self.writer.drain()

    async def close(self, code: int = 1000) -> None:
        """Send a close frame (once) and close the connection."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send(struct.pack("!H", code), CLOSE)
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()
