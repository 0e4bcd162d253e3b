"""A lean HTTP/2 server connection (RFC 9113), specialised for what gRPC needs.

``H2Connection`` is an ``asyncio.Protocol`` that parses frames straight out of the
received bytes (one ``struct`` unpack per frame header, no frame objects), keeps the
connection and stream flow-control windows, answers SETTINGS and PING, and coalesces
every frame produced in one event-loop iteration into a single ``transport.write``.
The gRPC layer (``transport.py``) subclasses it and implements the ``on_*`` hooks.

Header blocks are decoded by ``HpackDecoder`` (RFC 7541, dynamic table included; Huffman
strings go through the ``hpack`` package's decoder). Responses are never compressed
statefully: the gRPC layer emits static-table indexes and literals without indexing, so
our encoder has no dynamic table to keep in sync. A peer that breaks the protocol gets a
GOAWAY with the matching error code and the connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import ClassVar

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from pycontainerd.grpc.h2wire import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    FRAME,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    frame_header,
)

log = logging.getLogger(__name__)

NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
STREAM_CLOSED, FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL = 5, 6, 7, 8
COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 9, 11

# What we advertise. Inbound windows are generous so 1 MiB Content writes stream without
# stalls; the gRPC layer returns credit as its handlers consume messages.
STREAM_WINDOW = 4 << 20
CONNECTION_WINDOW = 32 << 20
MAX_FRAME = 1 << 20
MAX_STREAMS = 10000
MAX_HEADER_LIST = 1 << 20
# Connection credit is returned in batches: one WINDOW_UPDATE per this many bytes.
CONNECTION_CREDIT_BATCH = 1 << 20
_MAX_WINDOW = (1 << 31) - 1

_SETTING = struct.Struct(">HL")
_U32 = struct.Struct(">L")


# -- HPACK -----------------------------------------------------------------------------


# Index 0 is unused so that an HPACK index maps straight onto this tuple.
_STATIC: tuple[tuple[bytes, bytes], ...] = ((b"", b""), *HeaderTable.STATIC_TABLE)
_NSTATIC = len(_STATIC) - 1


class HpackError(Exception):
    """A malformed header block (a COMPRESSION_ERROR for the connection)."""


class HpackDecoder:
    """Decodes header blocks, keeping the dynamic table in step with the peer's encoder.

    Raises ``HpackError`` on any malformed block; the caller must then tear the
    connection down, since the table is no longer trustworthy.
    """

    __slots__ = ("_huffman", "allowed_size", "dynamic", "max_list_size", "max_size", "size")

    def __init__(self, allowed_size: int = 4096, max_list_size: int = MAX_HEADER_LIST) -> None:
        # Newest entry last: HPACK index 62 is dynamic[-1].
        self.dynamic: list[tuple[bytes, bytes]] = []
        self.size = 0
        self.max_size = allowed_size  # as last set by the peer's size updates
        self.allowed_size = allowed_size  # our SETTINGS_HEADER_TABLE_SIZE
        self.max_list_size = max_list_size
        self._huffman: dict[bytes, bytes] = {}

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= _NSTATIC:
            return _STATIC[index]
        pos = index - _NSTATIC
        if index > 0 and pos <= len(self.dynamic):
            return self.dynamic[-pos]
        raise HpackError(f"invalid header table index {index}")

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + 32
        self.dynamic.append((name, value))
        self.size += size
        self._evict()

    def _evict(self) -> None:
        dyn = self.dynamic
        while self.size > self.max_size and dyn:
            n, v = dyn.pop(0)
            self.size -= len(n) + len(v) + 32

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        headers: list[tuple[bytes, bytes]] = []
        pos = 0
        end = len(block)
        total = 0
        try:
            while pos < end:
                b = block[pos]
                if b & 0x80:  # indexed field
                    index = b & 0x7F
                    pos += 1
                    if index == 0x7F:
                        index, pos = self._int(block, pos, 0x7F)
                    if 0 < index <= _NSTATIC:
                        h = _STATIC[index]
                    elif _NSTATIC < index <= _NSTATIC + len(self.dynamic):
                        h = self.dynamic[_NSTATIC - index]
                    else:
                        h = self._entry(index)  # raises
                elif b & 0x40:  # literal with incremental indexing
                    index = b & 0x3F
                    pos += 1
                    if index == 0x3F:
                        index, pos = self._int(block, pos, 0x3F)
                    h, pos = self._literal(block, pos, index)
                    self._add(*h)
                elif b & 0x20:  # dynamic table size update
                    if headers:
                        raise HpackError("table size update after a header")
                    size = b & 0x1F
                    pos += 1
                    if size == 0x1F:
                        size, pos = self._int(block, pos, 0x1F)
                    if size > self.allowed_size:
                        raise HpackError(f"table size {size} above the allowed maximum")
                    self.max_size = size
                    self._evict()
                    continue
                else:  # literal without indexing / never indexed
                    index = b & 0x0F
                    pos += 1
                    if index == 0x0F:
                        index, pos = self._int(block, pos, 0x0F)
                    h, pos = self._literal(block, pos, index)
                headers.append(h)
                total += len(h[0]) + len(h[1]) + 32
                if total > self.max_list_size:
                    raise HpackError("header list too large")
        except IndexError as exc:
            raise HpackError("truncated header block") from exc
        return headers

    def _int(self, block: bytes, pos: int, value: int) -> tuple[int, int]:
        shift = 0
        while True:
            b = block[pos]
            pos += 1
            value += (b & 0x7F) << shift
            if not b & 0x80:
                return value, pos
            shift += 7
            if shift > 28:
                raise HpackError("integer overflow in header block")

    def _string(self, block: bytes, pos: int) -> tuple[bytes, int]:
        b = block[pos]
        length = b & 0x7F
        pos += 1
        if length == 0x7F:
            length, pos = self._int(block, pos, 0x7F)
        end = pos + length
        if end > len(block):
            raise HpackError("truncated header string")
        raw = block[pos:end]
        if not b & 0x80:
            return raw, end
        cache = self._huffman
        text = cache.get(raw)
        if text is None:
            try:
                text = decode_huffman(raw)
            except Exception as exc:
                raise HpackError(f"bad Huffman string: {exc}") from exc
            if len(cache) > 512:
                cache.clear()
            cache[raw] = text
        return text, end

    def _literal(self, block: bytes, pos: int, index: int) -> tuple[tuple[bytes, bytes], int]:
        if index:
            name = self._entry(index)[0]
        else:
            name, pos = self._string(block, pos)
        value, pos = self._string(block, pos)
        return (name, value), pos


# -- the connection --------------------------------------------------------------------


class ConnectionError_(Exception):
    """A connection error: GOAWAY with ``code``, then close."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class H2Stream:
    """Per-stream HTTP/2 state; the gRPC layer subclasses it."""

    __slots__ = ("drain_waiter", "id", "out", "out_size", "recv_closed", "recv_window",
                 "send_window", "trailers")  # fmt: skip

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.recv_closed = False  # the peer sent END_STREAM
        self.out: list[bytes | memoryview] = []  # DATA payload not sent yet
        self.out_size = 0
        self.trailers: bytes | None = None  # final HEADERS block, sent once out drains
        self.drain_waiter: asyncio.Future[None] | None = None


class H2Connection(asyncio.Protocol):
    """Server side of one HTTP/2 connection. Subclasses implement the ``on_*`` hooks."""

    SETTINGS_PAYLOAD: ClassVar[bytes] = b"".join(
        _SETTING.pack(k, v)
        for k, v in ((3, MAX_STREAMS), (4, STREAM_WINDOW), (5, MAX_FRAME), (6, MAX_HEADER_LIST))
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.last_sid = 0
        self.paused = False
        self.closing = False  # GOAWAY sent: no new streams
        self.peer_goaway = False
        self.send_window = 65535  # the peer's connection window for our DATA
        self.peer_initial_window = 65535
        self.peer_max_frame = 16384
        self._recv_window = CONNECTION_WINDOW
        self._credit = 0  # connection credit released but not sent yet
        self._decoder = HpackDecoder()
        self._buf = bytearray()
        self._preface = False
        self._settings_seen = False
        self._cont: tuple[int, bool, bytearray] | None = None  # header block being assembled
        self._out: list[bytes | memoryview] = []
        self._dirty: dict[int, H2Stream] = {}
        self._blocked: dict[int, H2Stream] = {}  # waiting for send window
        self._flush_handle: asyncio.Handle | None = None
        self._busy = False
        # We never index into a dynamic table, so shrink ours to 0 once: then no later
        # SETTINGS_HEADER_TABLE_SIZE from the peer can require a size update.
        self._table_reset = b"\x20"
        self._loop = asyncio.get_running_loop()

    # -- hooks for the gRPC layer ----------------------------------------------------

    def on_headers(self, sid: int, headers: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        raise NotImplementedError

    def on_data(self, s: H2Stream, data: bytes, flow: int, end_stream: bool) -> None:
        raise NotImplementedError

    def on_reset(self, s: H2Stream) -> None:
        """The stream is gone (the peer reset it, or we did on a stream error)."""

    def on_closed(self, s: H2Stream) -> None:
        """Our final HEADERS went out; the stream is removed."""

    def on_lost(self) -> None:
        """The connection is gone."""

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.set_write_buffer_limits(high=8 << 20)
        transport.write(
            frame(SETTINGS, 0, 0, self.SETTINGS_PAYLOAD)
            + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - 65535))
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        streams = list(self.streams.values())
        self.streams.clear()
        self._dirty.clear()
        self._blocked.clear()
        for s in streams:
            self.on_reset(s)
        self.on_lost()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self._busy = True
        try:
            if self._buf:
                self._buf += data
                used = self._frames(self._buf)
                del self._buf[:used]
            else:
                used = self._frames(data)
                if used < len(data):
                    self._buf += memoryview(data)[used:]
        except ConnectionError_ as exc:
            log.debug("HTTP/2 error from peer: %s", exc)
            self.fail(exc.code, str(exc))
            return
        except Exception as exc:
            log.exception("HTTP/2 connection failed")
            self.fail(INTERNAL_ERROR, type(exc).__name__)
            return
        finally:
            self._busy = False
        self._schedule()

    # -- inbound ---------------------------------------------------------------------

    def _frames(self, buf: bytes | bytearray) -> int:
        n = len(buf)
        pos = 0
        if not self._preface:
            if n < 24:
                if PREFACE[:n] != buf:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad connection preface")
                return 0
            if buf[:24] != PREFACE:
                raise ConnectionError_(PROTOCOL_ERROR, "bad connection preface")
            self._preface = True
            pos = 24
        unpack = FRAME.unpack_from
        while n - pos >= 9:
            hi, lo, ftype, flags, sid = unpack(buf, pos)
            length = hi << 16 | lo
            if length > MAX_FRAME:
                raise ConnectionError_(FRAME_SIZE_ERROR, f"frame of {length} bytes")
            end = pos + 9 + length
            if end > n:
                break
            payload = bytes(buf[pos + 9 : end])
            pos = end
            sid &= 0x7FFFFFFF
            if self._cont is not None and ftype != CONTINUATION:
                raise ConnectionError_(PROTOCOL_ERROR, "expected CONTINUATION")
            if not self._settings_seen:
                if ftype != SETTINGS or flags & ACK:
                    raise ConnectionError_(PROTOCOL_ERROR, "first frame is not SETTINGS")
                self._settings_seen = True
            if ftype == DATA:
                self._data_frame(sid, flags, payload)
            elif ftype == HEADERS:
                self._headers_frame(sid, flags, payload)
            elif ftype == WINDOW_UPDATE:
                self._window_update(sid, payload)
            elif ftype == SETTINGS:
                self._settings(sid, flags, payload)
            elif ftype == PING:
                if sid:
                    raise ConnectionError_(PROTOCOL_ERROR, "PING on a stream")
                if length != 8:
                    raise ConnectionError_(FRAME_SIZE_ERROR, "PING payload is not 8 bytes")
                if not flags & ACK:
                    self._out.append(frame(PING, ACK, 0, payload))
            elif ftype == RST_STREAM:
                self._rst_stream(sid, payload)
            elif ftype == CONTINUATION:
                self._continuation(sid, flags, payload)
            elif ftype == GOAWAY:
                if sid:
                    raise ConnectionError_(PROTOCOL_ERROR, "GOAWAY on a stream")
                if length < 8:
                    raise ConnectionError_(FRAME_SIZE_ERROR, "short GOAWAY")
                self.peer_goaway = True
            elif ftype == PRIORITY:
                if not sid:
                    raise ConnectionError_(PROTOCOL_ERROR, "PRIORITY on stream 0")
                if length != 5:
                    self.reset(sid, FRAME_SIZE_ERROR)
            elif ftype == PUSH_PROMISE:
                raise ConnectionError_(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            # Unknown frame types are ignored (RFC 9113 §4.1).
        return pos

    def _data_frame(self, sid: int, flags: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "DATA on stream 0")
        flow = len(payload)
        if flags & PADDED:
            if not flow or payload[0] >= flow:
                raise ConnectionError_(PROTOCOL_ERROR, "bad DATA padding")
            payload = payload[1 : flow - payload[0]]
        self._recv_window -= flow
        if self._recv_window < 0:
            raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window exceeded")
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_sid:
                raise ConnectionError_(PROTOCOL_ERROR, f"DATA on idle stream {sid}")
            self.credit_connection(flow)  # a stream we closed: only the connection counts it
            return
        if s.recv_closed:
            self.credit_connection(flow)
            self.reset(sid, STREAM_CLOSED)
            return
        s.recv_window -= flow
        if s.recv_window < 0:
            self.credit_connection(flow)
            self.reset(sid, FLOW_CONTROL_ERROR)
            return
        end = bool(flags & END_STREAM)
        if end:
            s.recv_closed = True
        self.on_data(s, payload, flow, end)

    def _headers_frame(self, sid: int, flags: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "HEADERS on stream 0")
        if flags & (PADDED | PRIORITY_FLAG):
            start, end = 0, len(payload)
            if flags & PADDED:
                if not end or payload[0] >= end:
                    raise ConnectionError_(PROTOCOL_ERROR, "bad HEADERS padding")
                start, end = 1, end - payload[0]
            if flags & PRIORITY_FLAG:
                start += 5
                if start > end:
                    raise ConnectionError_(FRAME_SIZE_ERROR, "short HEADERS priority")
            payload = payload[start:end]
        if flags & END_HEADERS:
            self._header_block(sid, bool(flags & END_STREAM), payload)
        else:
            self._cont = (sid, bool(flags & END_STREAM), bytearray(payload))

    def _continuation(self, sid: int, flags: int, payload: bytes) -> None:
        cont = self._cont
        if cont is None or cont[0] != sid:
            raise ConnectionError_(PROTOCOL_ERROR, "unexpected CONTINUATION")
        cont[2].extend(payload)
        if len(cont[2]) > MAX_HEADER_LIST:
            raise ConnectionError_(ENHANCE_YOUR_CALM, "header block too large")
        if flags & END_HEADERS:
            self._cont = None
            self._header_block(sid, cont[1], bytes(cont[2]))

    def _header_block(self, sid: int, end_stream: bool, block: bytes) -> None:
        try:
            headers = self._decoder.decode(block)
        except HpackError as exc:
            raise ConnectionError_(COMPRESSION_ERROR, str(exc)) from exc
        s = self.streams.get(sid)
        if s is not None:  # trailers: gRPC clients send none, but they must end the stream
            if s.recv_closed:
                self.reset(sid, STREAM_CLOSED)
            elif not end_stream:
                self.reset(sid, PROTOCOL_ERROR)
            else:
                s.recv_closed = True
                self.on_data(s, b"", 0, True)
            return
        if not sid & 1:
            raise ConnectionError_(PROTOCOL_ERROR, f"client opened even stream {sid}")
        if sid <= self.last_sid:
            return  # a stream we already closed; its headers were decoded above
        self.last_sid = sid
        if self.closing or self.peer_goaway or len(self.streams) >= MAX_STREAMS:
            self._out.append(frame(RST_STREAM, 0, sid, _U32.pack(REFUSED_STREAM)))
            return
        self.on_headers(sid, headers, end_stream)

    def _rst_stream(self, sid: int, payload: bytes) -> None:
        if not sid:
            raise ConnectionError_(PROTOCOL_ERROR, "RST_STREAM on stream 0")
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "RST_STREAM payload is not 4 bytes")
        if sid > self.last_sid:
            raise ConnectionError_(PROTOCOL_ERROR, f"RST_STREAM on idle stream {sid}")
        s = self.streams.pop(sid, None)
        if s is not None:
            self._forget(s)
            self.on_reset(s)

    def _window_update(self, sid: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionError_(FRAME_SIZE_ERROR, "WINDOW_UPDATE payload is not 4 bytes")
        inc = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not sid:
            if not inc:
                raise ConnectionError_(PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self.send_window += inc
            if self.send_window > _MAX_WINDOW:
                raise ConnectionError_(FLOW_CONTROL_ERROR, "connection window overflow")
            if self._blocked:
                self._dirty.update(self._blocked)
                self._blocked.clear()
            return
        s = self.streams.get(sid)
        if s is None:
            if sid > self.last_sid:
                raise ConnectionError_(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {sid}")
            return
        if not inc:
            self.reset(sid, PROTOCOL_ERROR)
            return
        s.send_window += inc
        if s.send_window > _MAX_WINDOW:
            self.reset(sid, FLOW_CONTROL_ERROR)
            return
        if self._blocked.pop(sid, None) is not None:
            self._dirty[sid] = s

    def _settings(self, sid: int, flags: int, payload: bytes) -> None:
        if sid:
            raise ConnectionError_(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionError_(FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        for i in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, i)
            if key == 4:  # INITIAL_WINDOW_SIZE: applies to open streams too
                if value > _MAX_WINDOW:
                    raise ConnectionError_(FLOW_CONTROL_ERROR, "initial window too large")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for s in self.streams.values():
                    s.send_window += delta
                    if s.send_window > _MAX_WINDOW:
                        raise ConnectionError_(FLOW_CONTROL_ERROR, "stream window overflow")
                if delta > 0 and self._blocked:
                    self._dirty.update(self._blocked)
                    self._blocked.clear()
            elif key == 5:  # MAX_FRAME_SIZE
                if not 16384 <= value <= (1 << 24) - 1:
                    raise ConnectionError_(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self.peer_max_frame = value
            elif key == 2 and value > 1:  # ENABLE_PUSH
                raise ConnectionError_(PROTOCOL_ERROR, f"ENABLE_PUSH {value}")
            # HEADER_TABLE_SIZE needs nothing (our encoder keeps no dynamic table), and
            # MAX_CONCURRENT_STREAMS / MAX_HEADER_LIST_SIZE limit requests, not responses.
        self._out.append(frame(SETTINGS, ACK, 0))

    # -- outbound --------------------------------------------------------------------

    def credit_stream(self, s: H2Stream, n: int) -> None:
        """Give the peer ``n`` bytes of stream window back (moot once it ended the stream)."""
        if not s.recv_closed and s.id in self.streams:
            s.recv_window += n
            self._out.append(frame(WINDOW_UPDATE, 0, s.id, _U32.pack(n)))
            self._schedule()

    def credit_connection(self, n: int) -> None:
        """Give the peer ``n`` bytes of connection window back, in batches."""
        self._recv_window += n
        self._credit += n
        if self._credit >= CONNECTION_CREDIT_BATCH:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._credit)))
            self._credit = 0
            self._schedule()

    def reset(self, sid: int, code: int) -> None:
        """A stream error: RST_STREAM and forget the stream."""
        self._out.append(frame(RST_STREAM, 0, sid, _U32.pack(code)))
        s = self.streams.pop(sid, None)
        if s is not None:
            self._forget(s)
            self.on_reset(s)
        self._schedule()

    def _forget(self, s: H2Stream) -> None:
        self._dirty.pop(s.id, None)
        self._blocked.pop(s.id, None)
        s.out.clear()
        s.out_size = 0
        s.trailers = None

    def send_headers(self, s: H2Stream, block: bytes, end_stream: bool) -> None:
        """Queue a HEADERS frame now (ahead of any DATA the stream still holds)."""
        if self._table_reset:
            block = self._table_reset + block
            self._table_reset = b""
        flags = END_STREAM if end_stream else 0
        limit = self.peer_max_frame
        if len(block) <= limit:
            self._out.append(frame_header(HEADERS, flags | END_HEADERS, s.id, len(block)))
            self._out.append(block)
        else:
            self._out.append(frame(HEADERS, flags, s.id, block[:limit]))
            for i in range(limit, len(block), limit):
                last = END_HEADERS if i + limit >= len(block) else 0
                self._out.append(frame(CONTINUATION, last, s.id, block[i : i + limit]))
        if end_stream:
            self._close(s)
        self._schedule()

    def send_data(self, s: H2Stream, *chunks: bytes) -> None:
        for c in chunks:
            s.out.append(c)
            s.out_size += len(c)
        self._dirty[s.id] = s
        self._schedule()

    def end_stream(self, s: H2Stream, block: bytes) -> None:
        """Send ``block`` as the final HEADERS once the buffered DATA is out."""
        s.trailers = block
        self._dirty[s.id] = s
        self._schedule()

    def _close(self, s: H2Stream) -> None:
        if not s.recv_closed:
            # We answered before the request ended: ask the peer to stop (RFC 9113 §8.1).
            self._out.append(frame(RST_STREAM, 0, s.id, _U32.pack(NO_ERROR)))
        if self.streams.pop(s.id, None) is not None:
            self._forget(s)
            self.on_closed(s)

    def _schedule(self) -> None:
        if self._flush_handle is None and not self._busy:
            self._flush_handle = self._loop.call_soon(self.flush)

    def flush_now(self) -> None:
        """Write what is pending at once (an RPC just ended), unless we are inside
        ``data_received``, whose end writes anyway."""
        if self._busy:
            return
        if self._flush_handle is not None:
            self._flush_handle.cancel()
        self.flush()

    def flush(self) -> None:
        self._flush_handle = None
        self._busy = True
        try:
            while self._dirty:
                dirty = list(self._dirty.values())
                self._dirty.clear()
                for s in dirty:
                    self._flush_stream(s)
        finally:
            self._busy = False
        self.write_out()

    def write_out(self) -> None:
        out = self._out
        if out:
            data = b"".join(out)
            out.clear()
            t = self.transport
            if t is not None and not t.is_closing():
                t.write(data)

    def _flush_stream(self, s: H2Stream) -> None:
        if s.out:
            data: bytes | memoryview = b"".join(s.out) if len(s.out) > 1 else s.out[0]
            s.out.clear()
            size = len(data)
            window = min(s.send_window, self.send_window)
            limit = self.peer_max_frame
            if size <= window and size <= limit:
                self._out.append(frame_header(DATA, 0, s.id, size))
                self._out.append(data)
                sent = size
            else:
                view = memoryview(data)
                sent = 0
                while sent < size and window > 0:
                    n = min(window, limit, size - sent)
                    self._out.append(frame_header(DATA, 0, s.id, n))
                    self._out.append(view[sent : sent + n])
                    sent += n
                    window -= n
            s.send_window -= sent
            self.send_window -= sent
            s.out_size = size - sent
            if sent < size:
                s.out.append(memoryview(data)[sent:])
                self._blocked[s.id] = s  # a WINDOW_UPDATE puts it back in _dirty
                return
            waiter = s.drain_waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        if s.trailers is not None:
            block, s.trailers = s.trailers, None
            self.send_headers(s, block, end_stream=True)

    def fail(self, code: int, message: str) -> None:
        """A connection error: GOAWAY, then close."""
        self.goaway(code, message)
        if self.transport is not None:
            self.transport.close()

    def goaway(self, code: int = NO_ERROR, message: str = "") -> None:
        if self.transport is None or self.transport.is_closing():
            return
        self.closing = True
        payload = _U32.pack(self.last_sid) + _U32.pack(code) + message.encode()[:256]
        self._out.append(frame(GOAWAY, 0, 0, payload))
        self.write_out()
