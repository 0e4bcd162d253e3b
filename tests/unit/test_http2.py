"""Our HTTP/2 layer at the frame level: a tiny raw-socket client drives the gRPC server
through protocol edge cases (bad preface, frames on the wrong stream, oversize frames,
CONTINUATION, padding, flow control, PING, RST_STREAM), and the HPACK decoder is checked
against the ``hpack`` package's encoder and decoder."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import random
import shutil
import struct
import tempfile
import tracemalloc
from typing import TYPE_CHECKING, Any

import grpc
import hpack
import pytest

from pycontainerd.grpc import h2wire
from pycontainerd.grpc.h2wire import hpack_int, hpack_literal
from pycontainerd.grpc.http2 import HpackDecoder, HpackError
from pycontainerd.grpc.transport import RESPONSE_HEADERS, Server

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS = 0, 1, 2, 3, 4
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
TIMEOUT = 10.0

Frame = tuple[int, int, int, bytes]


def frame(ftype: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def strict(raw: bytes) -> bytes:
    """A request deserializer that refuses one message."""
    if raw == b"bad":
        raise ValueError("not a message")
    return raw


class Behaviours:
    def __init__(self) -> None:
        self.finally_ran = asyncio.Event()
        self.release = asyncio.Event()

    async def unary(self, request: bytes, context: Any) -> bytes:
        return request[::-1]

    async def stream(self, request: bytes, context: Any) -> AsyncIterator[bytes]:
        count, size = (int(x) for x in request.split(b","))
        try:
            for i in range(count):
                yield bytes([i % 251]) * size
            if count == 0:
                await asyncio.sleep(30)
        finally:
            self.finally_ran.set()

    async def digests(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        """The SHA-256 of each request message, in order."""
        return b"".join([hashlib.sha256(r).digest() async for r in requests])

    async def hold(self, requests: AsyncIterator[bytes], context: Any) -> bytes:
        await self.release.wait()  # take nothing until told to
        return str(sum([len(r) async for r in requests])).encode()


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, Behaviours]]:
    d = tempfile.mkdtemp(prefix="pcdh-", dir="/tmp")
    path = os.path.join(d, "s.sock")
    b = Behaviours()
    srv = Server()
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Unary": grpc.unary_unary_rpc_method_handler(b.unary),
        "Stream": grpc.unary_stream_rpc_method_handler(b.stream),
        "Hold": grpc.stream_unary_rpc_method_handler(b.hold),
        "Digests": grpc.stream_unary_rpc_method_handler(b.digests),
        "Strict": grpc.stream_unary_rpc_method_handler(b.digests, request_deserializer=strict),
    }
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", handlers),))
    srv.add_insecure_port("unix:" + path)
    await srv.start()
    yield path, b
    await srv.stop(0)
    shutil.rmtree(d)


class Client:
    """Just enough of an HTTP/2 client to put arbitrary frames on the wire."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self.credit: dict[int, int] = {}  # WINDOW_UPDATE increments received, per stream

    @classmethod
    async def connect(cls, path: str, preface: bytes = h2wire.PREFACE) -> Client:
        reader, writer = await asyncio.open_unix_connection(path)
        c = cls(reader, writer)
        _open.append(c)
        if preface:
            c.raw(preface)
        return c

    def raw(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, ftype: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.raw(frame(ftype, flags, sid, payload))

    def settings(self, **values: int) -> None:
        codes = {"initial_window": 4, "max_frame": 5, "table_size": 1}
        self.send(
            SETTINGS, 0, 0, b"".join(struct.pack(">HL", codes[k], v) for k, v in values.items())
        )

    def request_block(self, method: str = "/t.T/Unary", **extra: str) -> bytes:
        headers = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", "x"),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            *extra.items(),
        ]
        return bytes(self.encoder.encode(headers, huffman=True))

    async def read_frame(self) -> Frame | None:
        try:
            head = await asyncio.wait_for(self.reader.readexactly(9), TIMEOUT)
            hi, lo, ftype, flags, sid = struct.unpack(">BHBBL", head)
            payload = await asyncio.wait_for(self.reader.readexactly(hi << 16 | lo), TIMEOUT)
        except asyncio.IncompleteReadError:
            return None
        if ftype == WINDOW_UPDATE:
            self.credit[sid] = self.credit.get(sid, 0) + int.from_bytes(payload, "big")
        return ftype, flags, sid & 0x7FFFFFFF, payload

    async def until(self, ftype: int, sid: int | None = None) -> Frame:
        while True:
            f = await self.read_frame()
            assert f is not None, f"connection closed while waiting for frame type {ftype}"
            if f[0] == ftype and (sid is None or f[2] == sid):
                return f

    async def goaway(self) -> int:
        """Read to the end of the connection; return the GOAWAY error code it sent."""
        code: int | None = None
        while (f := await self.read_frame()) is not None:
            if f[0] == GOAWAY:
                code = int.from_bytes(f[3][4:8], "big")
        assert code is not None, "connection closed without GOAWAY"
        return code

    async def response(self, sid: int) -> tuple[list[dict[bytes, bytes]], bytes, list[Frame]]:
        """Collect one stream's header blocks and DATA until END_STREAM."""
        blocks: list[dict[bytes, bytes]] = []
        data = bytearray()
        frames: list[Frame] = []
        while True:
            f = await self.read_frame()
            assert f is not None, "connection closed mid-response"
            if f[2] != sid:
                continue
            frames.append(f)
            if f[0] == HEADERS:
                blocks.append(dict(self.decoder.decode(f[3], raw=True)))
            elif f[0] == DATA:
                data += f[3]
            if f[1] & END_STREAM and f[0] in (HEADERS, DATA):
                return blocks, bytes(data), frames

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


_open: list[Client] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _open:
        await _open.pop().close()


async def test_unary_with_padding_priority_and_continuation(
    server: tuple[str, Behaviours],
) -> None:
    path, _ = server
    c = await Client.connect(path)
    c.settings()
    block = c.request_block(**{"x-long": "v" * 3000})
    # HEADERS with padding and priority, then the rest of the block in two CONTINUATIONs.
    first = bytes([7]) + b"\x00\x00\x00\x00\x10" + block[:10] + b"\x00" * 7
    c.send(HEADERS, PADDED | PRIORITY_FLAG, 1, first)
    c.send(CONTINUATION, 0, 1, block[10:100])
    c.send(CONTINUATION, END_HEADERS, 1, block[100:])
    c.send(DATA, PADDED | END_STREAM, 1, bytes([3]) + grpc_message(b"hello") + b"\x00" * 3)
    blocks, data, _ = await c.response(1)
    assert blocks[0][b":status"] == b"200"
    assert blocks[-1][b"grpc-status"] == b"0"
    assert data == grpc_message(b"olleh")


@pytest.mark.parametrize("cuts", ["frames of 1, 2, 3... bytes", "random"])
async def test_messages_cut_anywhere_across_frames(
    server: tuple[str, Behaviours], cuts: str
) -> None:
    """Request messages whose 5-byte prefixes and bodies are cut at any byte, several to
    a frame or one over many (empty, tiny, and larger than a frame), arrive whole."""
    path, _ = server
    c = await Client.connect(path)
    c.settings()
    bodies = [b"", b"a", os.urandom(70_000), b"", b"xyz", os.urandom(16_384), b"q" * 5]
    stream = b"".join(grpc_message(body) for body in bodies)
    rng = random.Random(7)
    sizes: list[int] = []
    n = 1
    while sum(sizes) < len(stream):
        sizes.append(n if cuts != "random" else rng.choice([1, 2, 4, 5, 6, 9, 1000, 16_000]))
        n = n % 7 + 1
    c.send(HEADERS, END_HEADERS, 1, c.request_block("/t.T/Digests"))
    pos = 0
    for size in sizes:
        c.send(DATA, 0, 1, stream[pos : pos + size])
        pos += size
    c.send(DATA, END_STREAM, 1)
    blocks, data, _ = await c.response(1)
    assert blocks[-1][b"grpc-status"] == b"0"
    assert data == grpc_message(b"".join(hashlib.sha256(b).digest() for b in bodies))


async def test_a_request_message_that_does_not_parse_is_internal(
    server: tuple[str, Behaviours],
) -> None:
    """As for a unary request (and as grpc-go answers), not UNKNOWN from the handler."""
    path, _ = server
    c = await Client.connect(path)
    c.settings()
    c.send(HEADERS, END_HEADERS, 1, c.request_block("/t.T/Strict"))
    c.send(DATA, 0, 1, grpc_message(b"fine"))
    c.send(DATA, END_STREAM, 1, grpc_message(b"bad"))
    blocks, _, _ = await c.response(1)
    assert blocks[-1][b"grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0]).encode()
    assert blocks[-1][b"grpc-message"].startswith(b"cannot parse request")


async def test_message_cut_short_by_end_of_stream(server: tuple[str, Behaviours]) -> None:
    path, _ = server
    c = await Client.connect(path)
    c.settings()
    c.send(HEADERS, END_HEADERS, 1, c.request_block("/t.T/Digests"))
    c.send(DATA, 0, 1, grpc_message(b"whole"))
    c.send(DATA, END_STREAM, 1, grpc_message(b"cut short")[:3])  # inside the prefix
    blocks, _, _ = await c.response(1)
    assert blocks[-1][b"grpc-status"] == str(grpc.StatusCode.INTERNAL.value[0]).encode()
    assert b"truncated" in blocks[-1][b"grpc-message"]


async def test_tiny_frames_of_one_message_cost_no_more_than_their_bytes(
    server: tuple[str, Behaviours],
) -> None:
    """A message sent a byte per DATA frame is held in about its own size while it
    arrives, not a Python object per frame."""
    path, b = server
    c = await Client.connect(path)
    c.settings()
    c.send(HEADERS, END_HEADERS, 1, c.request_block("/t.T/Hold"))
    body = os.urandom(60_000)
    message = grpc_message(body)
    c.send(DATA, 0, 1, message[:5])
    c.send(PING, 0, 0, b"prefix!!")
    await c.until(PING)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(5, len(message) - 1):
            c.send(DATA, 0, 1, message[i : i + 1])
        c.send(PING, 0, 0, b"in-order")  # answered once every DATA frame is handled
        await c.until(PING)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < 4 * len(body), f"{held} bytes held for {len(body)} bytes of message"
    c.send(DATA, END_STREAM, 1, message[-1:])
    b.release.set()
    _, data, _ = await c.response(1)
    assert data == grpc_message(str(len(body)).encode())


async def test_ping_settings_and_window_update_mid_call(server: tuple[str, Behaviours]) -> None:
    path, _ = server
    c = await Client.connect(path)
    c.settings(initial_window=1000, max_frame=16384)
    c.send(HEADERS, END_HEADERS, 1, c.request_block("/t.T/Stream"))
    c.send(DATA, END_STREAM, 1, grpc_message(b"3,10000"))
    # Only the 1000-byte stream window's worth of DATA may arrive.
    got = 0
    while got < 1000:
        f = await c.until(DATA, 1)
        got += len(f[3])
        assert len(f[3]) <= 16384
    assert got == 1000
    c.send(PING, 0, 0, b"12345678")
    ack = await c.until(PING)
    assert ack[1] == 1 and ack[3] == b"12345678"
    # Raising the initial window applies to the open stream; WINDOW_UPDATE adds the rest.
    c.settings(initial_window=20000)
    c.send(WINDOW_UPDATE, 0, 1, struct.pack(">L", 100000))
    blocks, data, frames = await c.response(1)
    assert got + len(data) == 3 * 10005
    assert all(len(f[3]) <= 16384 for f in frames)
    assert blocks[-1][b"grpc-status"] == b"0"


async def test_connection_window_blocks_then_resumes(server: tuple[str, Behaviours]) -> None:
    path, _ = server
    c = await Client.connect(path)
    c.settings(initial_window=1 << 20)
    for sid in (1, 3):
        c.send(HEADERS, END_HEADERS, sid, c.request_block("/t.T/Stream"))
        c.send(DATA, END_STREAM, sid, grpc_message(b"1,50000"))
    seen = {1: 0, 3: 0}
    ended: set[int] = set()

    async def read_until(done: Any) -> None:
        while not done():
            f = await c.read_frame()
            assert f is not None
            if f[0] == HEADERS and f[1] & END_STREAM:
                ended.add(f[2])
            elif f[0] == DATA:
                seen[f[2]] += len(f[3])

    # The default connection window (65535 bytes) is shared by both streams.
    await read_until(lambda: seen[1] + seen[3] >= 65535)
    assert seen[1] + seen[3] == 65535
    c.send(WINDOW_UPDATE, 0, 0, struct.pack(">L", 1 << 20))
    await read_until(lambda: len(ended) == 2)
    assert seen == {1: 50005, 3: 50005}


async def test_credit_is_held_back_while_the_handler_lags(server: tuple[str, Behaviours]) -> None:
    path, b = server
    c = await Client.connect(path)
    c.settings()
    await c.until(SETTINGS)  # the server's: a 4 MiB stream window
    await c.until(WINDOW_UPDATE, 0)  # and its connection window, raised to 32 MiB
    c.credit.clear()
    c.send(HEADERS, END_HEADERS, 1, c.request_block("/t.T/Hold"))
    message = grpc_message(b"m" * (64 << 10))
    for _ in range(32):  # 2 MiB of complete messages the handler does not take
        for i in range(0, len(message), 16384):
            c.send(DATA, 0, 1, message[i : i + 16384])
    c.send(PING, 0, 0, b"in-order")  # answered once every DATA frame before it was handled
    await c.until(PING)
    sent = 32 * len(message)
    # Beyond about QUEUED_LIMIT (1 MiB) of queued messages, neither window is replenished.
    assert c.credit.get(1, 0) <= sent - (1 << 20) + (256 << 10), c.credit
    assert c.credit.get(0, 0) <= sent - (1 << 20) + (256 << 10), c.credit
    b.release.set()
    c.send(DATA, END_STREAM, 1)
    _, data, _ = await c.response(1)
    assert data == grpc_message(str(32 * (64 << 10)).encode())
    # Once the handler caught up, the connection got its credit back (in 1 MiB batches).
    c.send(PING, 0, 0, b"12345678")
    await c.until(PING)
    assert c.credit[0] > sent - (1 << 20), c.credit


async def test_rst_stream_cancels_the_handler(server: tuple[str, Behaviours]) -> None:
    path, b = server
    c = await Client.connect(path)
    c.settings()
    c.send(HEADERS, END_HEADERS, 1, c.request_block("/t.T/Stream"))
    c.send(DATA, END_STREAM, 1, grpc_message(b"0,1"))
    await asyncio.sleep(0.1)
    c.send(RST_STREAM, 0, 1, struct.pack(">L", 8))
    await asyncio.wait_for(b.finally_ran.wait(), TIMEOUT)
    # The connection still serves calls.
    c.send(HEADERS, END_HEADERS, 3, c.request_block())
    c.send(DATA, END_STREAM, 3, grpc_message(b"ab"))
    _, data, _ = await c.response(3)
    assert data == grpc_message(b"ba")


async def test_unknown_method_is_trailers_only_and_resets_unfinished_request(
    server: tuple[str, Behaviours],
) -> None:
    path, _ = server
    c = await Client.connect(path)
    c.settings()
    c.send(HEADERS, END_HEADERS, 1, c.request_block("/t.T/Nope"))
    blocks, data, _ = await c.response(1)
    assert len(blocks) == 1 and data == b""
    assert blocks[0][b"grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0]).encode()
    rst = await c.until(RST_STREAM, 1)
    assert struct.unpack(">L", rst[3])[0] == 0  # NO_ERROR: stop sending, all is well
    c.send(DATA, END_STREAM, 1, grpc_message(b"late"))  # ignored, not an error
    c.send(HEADERS, END_HEADERS, 3, c.request_block())
    c.send(DATA, END_STREAM, 3, grpc_message(b"ok"))
    _, data, _ = await c.response(3)
    assert data == grpc_message(b"ko")


async def test_unknown_frame_types_are_ignored(server: tuple[str, Behaviours]) -> None:
    path, _ = server
    c = await Client.connect(path)
    c.settings()
    c.send(0x42, 0xFF, 0, b"whatever")
    c.send(PRIORITY, 0, 5, b"\x00\x00\x00\x00\x10")
    c.send(HEADERS, END_HEADERS, 1, c.request_block())
    c.send(DATA, END_STREAM, 1, grpc_message(b"xy"))
    _, data, _ = await c.response(1)
    assert data == grpc_message(b"yx")


@pytest.mark.parametrize(
    ("name", "wire", "code"),
    [
        ("bad preface", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 1),
        ("first frame not SETTINGS", h2wire.PREFACE + frame(PING, 0, 0, b"12345678"), 1),
        ("DATA on stream 0", frame(SETTINGS, 0, 0) + frame(DATA, 0, 0, b"x"), 1),
        ("HEADERS on stream 0", frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 0, b""), 1),
        ("even stream id", frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 2, b"\x83"), 1),
        # Only the header of a frame longer than our MAX_FRAME_SIZE: it is refused unread.
        ("oversize frame", frame(SETTINGS, 0, 0) + struct.pack(">BHBBL", 16, 1, 0, 0, 1), 6),
        ("DATA on idle stream", frame(SETTINGS, 0, 0) + frame(DATA, 0, 7, b"x"), 1),
        ("RST_STREAM on stream 0", frame(SETTINGS, 0, 0) + frame(RST_STREAM, 0, 0, b"\0" * 4), 1),
        ("short PING", frame(SETTINGS, 0, 0) + frame(PING, 0, 0, b"1234"), 6),
        ("SETTINGS bad length", frame(SETTINGS, 0, 0) + frame(SETTINGS, 0, 0, b"12345"), 6),
        ("zero WINDOW_UPDATE", frame(SETTINGS, 0, 0) + frame(WINDOW_UPDATE, 0, 0, b"\0" * 4), 1),
        ("garbage HPACK", frame(SETTINGS, 0, 0) + frame(HEADERS, END_HEADERS, 1, b"\xff\xff"), 9),
        ("bad padding", frame(SETTINGS, 0, 0) + frame(HEADERS, 0x0C, 1, b"\x05ab"), 1),
        (
            "frame between HEADERS and CONTINUATION",
            frame(SETTINGS, 0, 0) + frame(HEADERS, 0, 1, b"\x83") + frame(PING, 0, 0, b"1" * 8),
            1,
        ),
        (
            "window overflow",
            frame(SETTINGS, 0, 0) + frame(WINDOW_UPDATE, 0, 0, struct.pack(">L", 0x7FFFFFFF)),
            3,
        ),
        ("bad MAX_FRAME_SIZE", frame(SETTINGS, 0, 0, struct.pack(">HL", 5, 100)), 1),
    ],
)
async def test_protocol_errors_close_only_that_connection(
    server: tuple[str, Behaviours], name: str, wire: bytes, code: int
) -> None:
    path, _ = server
    good = await Client.connect(path)
    good.settings()
    preface = b"" if name == "bad preface" or wire.startswith(h2wire.PREFACE) else h2wire.PREFACE
    bad = await Client.connect(path, preface=preface)
    bad.raw(wire)
    assert await bad.goaway() == code, name
    good.send(HEADERS, END_HEADERS, 1, good.request_block())
    good.send(DATA, END_STREAM, 1, grpc_message(b"still"))
    _, data, _ = await good.response(1)
    assert data == grpc_message(b"llits")


# -- HPACK ------------------------------------------------------------------------------


def test_response_blocks_decode_as_intended() -> None:
    d = hpack.Decoder()
    assert d.decode(RESPONSE_HEADERS, raw=True) == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
    ]
    assert d.decode(hpack_literal(b"grpc-message", b"x" * 300), raw=True) == [
        (b"grpc-message", b"x" * 300)
    ]
    assert len(d.header_table.dynamic_entries) == 0  # nothing was indexed


@pytest.mark.parametrize("value", [0, 1, 14, 15, 16, 126, 127, 128, 300, 16383, 1 << 20])
def test_hpack_int_round_trip(value: int) -> None:
    for prefix in (4, 5, 6, 7):
        encoded = hpack_int(value, prefix)
        assert hpack.hpack.decode_integer(encoded, prefix) == (value, len(encoded))


def test_decoder_matches_hpack_package() -> None:
    rng = random.Random(7)
    names = [b"content-type", b"grpc-timeout", b"x-a", b"x-bin", b":path", b"user-agent"]
    enc = hpack.Encoder()
    ref = hpack.Decoder()
    ours = HpackDecoder()
    for i in range(400):
        headers = []
        for _ in range(rng.randint(0, 12)):
            name = rng.choice(names) if rng.random() < 0.7 else os.urandom(4).hex().encode()
            value = bytes(rng.randrange(32, 127) for _ in range(rng.choice((0, 1, 5, 40, 200))))
            headers.append(
                hpack.NeverIndexedHeaderTuple(name, value) if rng.random() < 0.1 else (name, value)
            )
        if i % 50 == 49:
            enc.header_table_size = rng.choice((0, 256, 4096))
        block = enc.encode(headers, huffman=rng.random() < 0.5)
        assert ours.decode(block) == ref.decode(block, raw=True)
    assert ours.size == ref.header_table._current_size


@pytest.mark.parametrize(
    "block",
    [
        b"\xbe",  # dynamic index that does not exist
        b"\x80",  # index 0
        b"\x40\x85abc",  # truncated literal
        b"\x00\x81\xff\x01a",  # Huffman string with an EOS code
        b"\x3f\xe2\x1f",  # table size update above the allowed 4096
        b"\x82\x20",  # table size update after a header
        b"\xff\xff\xff\xff\xff\xff\x01",  # integer overflow
    ],
)
def test_decoder_rejects_malformed_blocks(block: bytes) -> None:
    with pytest.raises(HpackError):
        HpackDecoder().decode(block)


def test_decoder_limits_header_list_size() -> None:
    block = hpack_literal(b"x", b"y" * 2000)
    with pytest.raises(HpackError):
        HpackDecoder(max_list_size=1000).decode(block)
