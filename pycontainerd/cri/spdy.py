"""SPDY/3.1, server side, as far as Kubernetes' streaming clients use it.

kubectl, crictl and kubelet's proxy open exec/attach/port-forward sessions with an HTTP
upgrade to ``SPDY/3.1`` and then speak moby/spdystream: the client opens one stream per
channel (SYN_STREAM carrying headers such as ``streamtype``), the server answers each with
SYN_REPLY, and both sides send DATA frames, ending their half of a stream with FLAG_FIN.

Frames (SPDY/3 draft, §2.2): a control frame starts with the control bit, version 3 and a
16-bit type, then 8 bits of flags and a 24-bit length; a data frame starts with a 31-bit
stream id, then flags and length. Header blocks are zlib streams primed with the
protocol's fixed dictionary (§2.6.10.1), one compression context per direction for the
whole connection, so frames must be encoded in the order they are written.

Flow control: spdystream neither sends WINDOW_UPDATE nor waits for one, so a server that
honoured the 64 KiB initial send window would stall every transfer after 64 KiB. We
therefore never block on the peer's window (TCP pushes back instead: every data write
awaits ``drain``) but do grant window to the peer as the application consumes data, so a
client that enforces SPDY/3.1 windows keeps flowing too. The read loop stops reading the
socket while one stream holds more than ``STREAM_BUFFER`` unread bytes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import struct
import zlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "CANCEL",
    "DICTIONARY",
    "FLAG_FIN",
    "PROTOCOL_ERROR",
    "REFUSED_STREAM",
    "Connection",
    "Data",
    "Frame",
    "Framer",
    "GoAway",
    "Headers",
    "Ping",
    "RstStream",
    "SPDYError",
    "Settings",
    "Stream",
    "SynReply",
    "SynStream",
    "WindowUpdate",
]

log = logging.getLogger(__name__)

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = (
    1, 2, 3, 4, 6, 7, 8, 9,
)  # fmt: skip
FLAG_FIN, FLAG_UNIDIRECTIONAL = 0x01, 0x02
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL = 1, 2, 3, 5
INITIAL_WINDOW = 64 << 10
MAX_CHUNK = 32 << 10  # what spdystream's io.Copy writes per frame; keeps streams interleaved
STREAM_BUFFER = 1 << 20
MAX_HEADER_BLOCK = 256 << 10


def _dictionary() -> bytes:
    # The SPDY/3 header dictionary (draft 3, §2.6.10.1): length-prefixed header names and
    # common values, then a run of status codes, reason phrases, dates and media types.
    words = (
        "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset",
        "accept-encoding", "accept-language", "accept-ranges", "age", "allow",
        "authorization", "cache-control", "connection", "content-base", "content-encoding",
        "content-language", "content-length", "content-location", "content-md5",
        "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host",
        "if-match", "if-modified-since", "if-none-match", "if-range", "if-unmodified-since",
        "last-modified", "location", "max-forwards", "pragma", "proxy-authenticate",
        "proxy-authorization", "range", "referer", "retry-after", "server", "te", "trailer",
        "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
        "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url",
        "public", "set-cookie", "keep-alive", "origin",
    )  # fmt: skip
    head = b"".join(struct.pack(">I", len(w)) + w.encode() for w in words)
    codes = "100101201202205206300302303304305306307402405406407408409410411412413414415416417"
    tail = (
        f"{codes}502504505203 Non-Authoritative Information204 No Content"
        "301 Moved Permanently400 Bad Request401 Unauthorized403 Forbidden404 Not Found"
        "500 Internal Server Error501 Not Implemented503 Service Unavailable"
        "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
        "Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
        "chunked,text/html,image/png,image/jpg,image/gif,application/xml,"
        "application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
        "gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
    )
    return head + tail.encode()


DICTIONARY = _dictionary()


class SPDYError(Exception):
    """The peer broke SPDY framing; the connection is dropped (with a GOAWAY)."""


# ---------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class SynStream:
    stream_id: int
    headers: dict[str, str]  # lower-case names; several values are joined by NUL
    flags: int = 0
    associated_id: int = 0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class SynReply:
    stream_id: int
    headers: dict[str, str] = field(default_factory=dict)
    flags: int = 0


@dataclass(frozen=True, slots=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True, slots=True)
class Settings:
    entries: tuple[tuple[int, int, int], ...]  # (flags, id, value)
    flags: int = 0


@dataclass(frozen=True, slots=True)
class Ping:
    ping_id: int


@dataclass(frozen=True, slots=True)
class GoAway:
    last_stream_id: int
    status: int = 0


@dataclass(frozen=True, slots=True)
class Headers:
    stream_id: int
    headers: dict[str, str]
    flags: int = 0


@dataclass(frozen=True, slots=True)
class WindowUpdate:
    stream_id: int
    delta: int


@dataclass(frozen=True, slots=True)
class Data:
    stream_id: int
    data: bytes
    flags: int = 0


Frame = SynStream | SynReply | RstStream | Settings | Ping | GoAway | Headers | WindowUpdate | Data


class Framer:
    """Encodes and decodes frames for one connection (owning its two zlib contexts)."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, zdict=DICTIONARY)
        self._inflate = zlib.decompressobj(15, zdict=DICTIONARY)

    # -- header blocks

    def encode_headers(self, headers: dict[str, str]) -> bytes:
        raw = bytearray(struct.pack(">I", len(headers)))
        for name, value in headers.items():
            n, v = name.lower().encode(), value.encode()
            raw += struct.pack(">I", len(n)) + n + struct.pack(">I", len(v)) + v
        # A sync flush ends the block on a byte boundary without ending the zlib stream,
        # which continues in the next header block.
        return self._deflate.compress(bytes(raw)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def decode_headers(self, block: bytes) -> dict[str, str]:
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise SPDYError(f"bad header block: {exc}") from exc
        if self._inflate.unconsumed_tail:
            raise SPDYError("header block too large")
        try:
            (count,) = struct.unpack_from(">I", raw)
            pos, headers = 4, {}
            for _ in range(count):
                (n,) = struct.unpack_from(">I", raw, pos)
                name = raw[pos + 4 : pos + 4 + n].decode("latin-1").lower()
                pos += 4 + n
                (n,) = struct.unpack_from(">I", raw, pos)
                value = raw[pos + 4 : pos + 4 + n]
                if len(value) != n:
                    raise SPDYError("truncated header block")
                headers[name] = value.decode("utf-8", "replace")
                pos += 4 + n
        except struct.error as exc:
            raise SPDYError("truncated header block") from exc
        return headers

    # -- frames

    def encode(self, frame: Frame) -> bytes:
        if isinstance(frame, Data):
            if len(frame.data) >= 1 << 24:
                raise ValueError("data frame too large")
            return struct.pack(">II", frame.stream_id, frame.flags << 24 | len(frame.data)) + (
                frame.data
            )
        flags = 0
        if isinstance(frame, SynStream):
            kind, flags = SYN_STREAM, frame.flags
            body = struct.pack(
                ">IIBB", frame.stream_id, frame.associated_id, frame.priority << 5, 0
            )
            body += self.encode_headers(frame.headers)
        elif isinstance(frame, SynReply):
            kind, flags = SYN_REPLY, frame.flags
            body = struct.pack(">I", frame.stream_id) + self.encode_headers(frame.headers)
        elif isinstance(frame, RstStream):
            kind, body = RST_STREAM, struct.pack(">II", frame.stream_id, frame.status)
        elif isinstance(frame, Settings):
            kind, flags = SETTINGS, frame.flags
            body = struct.pack(">I", len(frame.entries)) + b"".join(
                struct.pack(">II", f << 24 | i, v) for f, i, v in frame.entries
            )
        elif isinstance(frame, Ping):
            kind, body = PING, struct.pack(">I", frame.ping_id)
        elif isinstance(frame, GoAway):
            kind, body = GOAWAY, struct.pack(">II", frame.last_stream_id, frame.status)
        elif isinstance(frame, Headers):
            kind, flags = HEADERS, frame.flags
            body = struct.pack(">I", frame.stream_id) + self.encode_headers(frame.headers)
        else:
            kind, body = WINDOW_UPDATE, struct.pack(">II", frame.stream_id, frame.delta)
        return struct.pack(">HHI", 0x8000 | VERSION, kind, flags << 24 | len(body)) + body

    def decode(self, head: bytes, body: bytes) -> Frame | None:
        """The frame of an 8-byte ``head`` and its ``body``; None for a control frame type
        this side does not know (SPDY says: ignore it)."""
        w0, w1 = struct.unpack(">II", head)
        flags = w1 >> 24
        if not w0 & 0x80000000:
            return Data(w0, body, flags)
        kind = w0 & 0xFFFF
        try:
            if kind == SYN_STREAM:
                sid, assoc, pri, _slot = struct.unpack_from(">IIBB", body)
                headers = self.decode_headers(body[10:])
                return SynStream(sid & 0x7FFFFFFF, headers, flags, assoc & 0x7FFFFFFF, pri >> 5)
            if kind in (SYN_REPLY, HEADERS):
                (sid,) = struct.unpack_from(">I", body)
                cls = SynReply if kind == SYN_REPLY else Headers
                return cls(sid & 0x7FFFFFFF, self.decode_headers(body[4:]), flags)
            if kind == RST_STREAM:
                sid, status = struct.unpack_from(">II", body)
                return RstStream(sid & 0x7FFFFFFF, status)
            if kind == SETTINGS:
                (count,) = struct.unpack_from(">I", body)
                pairs = [struct.unpack_from(">II", body, 4 + 8 * i) for i in range(count)]
                return Settings(tuple((fi >> 24, fi & 0xFFFFFF, v) for fi, v in pairs), flags)
            if kind == PING:
                return Ping(struct.unpack_from(">I", body)[0])
            if kind == GOAWAY:
                sid, status = struct.unpack_from(">II", body)
                return GoAway(sid & 0x7FFFFFFF, status)
            if kind == WINDOW_UPDATE:
                sid, delta = struct.unpack_from(">II", body)
                return WindowUpdate(sid & 0x7FFFFFFF, delta & 0x7FFFFFFF)
        except struct.error as exc:
            raise SPDYError(f"control frame {kind} is too short") from exc
        return None

    async def read(self, reader: asyncio.StreamReader) -> Frame | None:
        head = await reader.readexactly(8)
        body = await reader.readexactly(struct.unpack_from(">I", head, 4)[0] & 0xFFFFFF)
        return self.decode(head, body)


# ---------------------------------------------------------------------- streams


class Stream:
    """One client-opened stream: ``read`` what the client sends, ``write`` back."""

    def __init__(self, conn: Connection, stream_id: int, headers: dict[str, str]) -> None:
        self.conn = conn
        self.id = stream_id
        self.headers = headers
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._unacked = 0
        self._remote_done = False
        self._local_done = False
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def header(self, name: str) -> str:
        """The first value of header ``name`` ('' when absent)."""
        return self.headers.get(name, "").split("\0")[0]

    async def read(self) -> bytes:
        """The next chunk the client sent; b'' once it finished (FIN), reset or left."""
        while not self._chunks:
            if self._remote_done:
                return b""
            self._readable.clear()
            await self._readable.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        if self._buffered <= STREAM_BUFFER:
            self._room.set()
        self._unacked += len(chunk)
        if self._unacked >= INITIAL_WINDOW // 2 and not self._remote_done:
            self.conn.send_nowait(WindowUpdate(self.id, self._unacked))
            self._unacked = 0
        self.conn.consumed(len(chunk))
        return chunk

    async def write(self, data: bytes, fin: bool = False) -> None:
        """Send ``data`` (and FIN when ``fin``); ConnectionResetError once the stream or the
        connection is closed on our side."""
        if self._local_done or self.conn.closing:
            raise ConnectionResetError(f"SPDY stream {self.id} is closed")
        for i in range(0, len(data), MAX_CHUNK):
            last = i + MAX_CHUNK >= len(data)
            flags = FLAG_FIN if fin and last else 0
            await self.conn.send(Data(self.id, data[i : i + MAX_CHUNK], flags))
        if fin:
            self._local_done = True
            if not data:
                await self.conn.send(Data(self.id, b"", FLAG_FIN))

    async def close(self) -> None:
        """Half-close: FIN our side (once); the client may still send."""
        if not self._local_done and not self.conn.closing:
            with contextlib.suppress(ConnectionError):
                await self.write(b"", fin=True)
        self._local_done = True

    def reset(self, status: int = CANCEL) -> None:
        """Abort the stream in both directions."""
        if not (self._local_done and self._remote_done):
            self.conn.send_nowait(RstStream(self.id, status))
        self._local_done = True
        self._finish_remote()

    async def _feed(self, data: bytes, fin: bool) -> None:
        if data and not self._remote_done:
            self._chunks.append(data)
            self._buffered += len(data)
            self._readable.set()
            if self._buffered > STREAM_BUFFER:
                # Stop reading the socket until the application catches up: the client's
                # TCP window closes and it blocks, as spdystream peers expect.
                self._room.clear()
                await self._room.wait()
        if fin:
            self._finish_remote()

    def _finish_remote(self) -> None:
        self._remote_done = True
        self._readable.set()
        self._room.set()


# ---------------------------------------------------------------------- connection


class Connection:
    """A server-side SPDY/3.1 connection over an upgraded socket.

    ``validate`` sees each new stream's headers and returns a reason to refuse it (the
    client gets RST_STREAM REFUSED_STREAM) or None; accepted streams are answered with
    SYN_REPLY at once and handed out by ``accept``.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        validate: Callable[[dict[str, str]], str | None] | None = None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.closing = False
        self._validate = validate
        self._framer = Framer()
        self._streams: dict[int, Stream] = {}
        self._incoming: asyncio.Queue[Stream | None] = asyncio.Queue()
        self._last_id = 0
        self._session_unacked = 0
        self._no_more = False
        self.done = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    async def accept(self) -> Stream | None:
        """The next stream the client opened; None once it will open no more."""
        if self._incoming.empty() and self._no_more:
            return None
        return await self._incoming.get()

    def send_nowait(self, frame: Frame) -> None:
        """Queue a frame without waiting for the socket (control frames)."""
        if not self.writer.is_closing():
            # Encoding and writing with no await in between keeps the zlib context in
            # step with the byte order on the wire.
            self.writer.write(self._framer.encode(frame))

    async def send(self, frame: Frame) -> None:
        if self.writer.is_closing():
            raise ConnectionResetError("SPDY connection is closed")
        self.writer.write(self._framer.encode(frame))
        await self.writer.drain()

    def consumed(self, n: int) -> None:
        """The application read ``n`` bytes: grant session window when half is used."""
        self._session_unacked += n
        if self._session_unacked >= INITIAL_WINDOW // 2:
            self.send_nowait(WindowUpdate(0, self._session_unacked))
            self._session_unacked = 0

    async def close(self, grace: float = 5.0) -> None:
        """FIN every stream, say GOAWAY, give the client ``grace`` seconds to take that
        and hang up, then close the socket."""
        if not self.closing:
            self.closing = True
            for s in self._streams.values():
                if not s._local_done:
                    s._local_done = True
                    self.send_nowait(Data(s.id, b"", FLAG_FIN))
            self.send_nowait(GoAway(self._last_id, 0))
            if grace > 0:
                # A client that stopped reading must not hold the session up for ever.
                with contextlib.suppress(TimeoutError, ConnectionError):
                    await asyncio.wait_for(self.writer.drain(), grace)
        if grace > 0:
            await asyncio.wait({self._task}, timeout=grace)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()

    async def _run(self) -> None:
        try:
            while True:
                frame = await self._framer.read(self.reader)
                if frame is not None:
                    await self._dispatch(frame)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except SPDYError as exc:
            log.debug("SPDY client broke the protocol: %s", exc)
            with contextlib.suppress(ConnectionError):
                self.send_nowait(GoAway(self._last_id, PROTOCOL_ERROR))
        finally:
            for s in self._streams.values():
                s._finish_remote()
            self.done.set()
            self._no_more = True
            self._incoming.put_nowait(None)

    async def _dispatch(self, frame: Frame) -> None:
        if isinstance(frame, Data):
            stream = self._streams.get(frame.stream_id)
            if stream is not None:
                await stream._feed(frame.data, bool(frame.flags & FLAG_FIN))
            elif frame.stream_id > self._last_id or frame.stream_id % 2 == 0:
                self.send_nowait(RstStream(frame.stream_id, INVALID_STREAM))
        elif isinstance(frame, SynStream):
            sid = frame.stream_id
            if sid % 2 == 0 or sid <= self._last_id:
                # Client stream ids are odd and only grow (SPDY/3 §2.3.2).
                self.send_nowait(RstStream(sid, PROTOCOL_ERROR))
                return
            self._last_id = sid
            reason = self._validate(frame.headers) if self._validate else None
            if reason is not None or self.closing:
                log.debug("refusing SPDY stream %d: %s", sid, reason or "closing")
                self.send_nowait(RstStream(sid, REFUSED_STREAM))
                return
            stream = Stream(self, sid, frame.headers)
            self._streams[sid] = stream
            self.send_nowait(SynReply(sid))
            if frame.flags & FLAG_FIN:
                stream._finish_remote()
            if frame.flags & FLAG_UNIDIRECTIONAL:
                stream._local_done = True
            self._incoming.put_nowait(stream)
        elif isinstance(frame, RstStream):
            stream = self._streams.pop(frame.stream_id, None)
            if stream is not None:
                stream._local_done = True
                stream._finish_remote()
        elif isinstance(frame, Headers):
            stream = self._streams.get(frame.stream_id)
            if stream is not None and frame.flags & FLAG_FIN:
                stream._finish_remote()
        elif isinstance(frame, Ping):
            if frame.ping_id % 2 == 1:  # the client's; even ids would answer our own
                self.send_nowait(frame)
        elif isinstance(frame, GoAway):
            # No new streams will come; the open ones carry on.
            self._no_more = True
            self._incoming.put_nowait(None)
        # SETTINGS and WINDOW_UPDATE are accepted and ignored: see the module docstring.
