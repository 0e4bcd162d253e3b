"""The stateless pieces of HTTP/2 on the wire: frame types and flags, frame encoding,
and HPACK's integer and plain-literal encodings.

Apart from ``http2`` (which needs asyncio and the ``hpack`` package) so that ``pcd
pull``'s bare client (``pycontainerd.cli.quickpull``) can use them without loading either.
"""

from __future__ import annotations

import struct

__all__ = [
    "ACK",
    "CONTINUATION",
    "DATA",
    "END_HEADERS",
    "END_STREAM",
    "FRAME",
    "GOAWAY",
    "HEADERS",
    "PADDED",
    "PING",
    "PREFACE",
    "PRIORITY",
    "PRIORITY_FLAG",
    "PUSH_PROMISE",
    "RST_STREAM",
    "SETTINGS",
    "WINDOW_UPDATE",
    "frame",
    "frame_header",
    "hpack_int",
    "hpack_literal",
]

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

FRAME = struct.Struct(">BHBBL")  # 24-bit length as byte + short, type, flags, stream id


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return FRAME.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def frame_header(ftype: int, flags: int, stream_id: int, length: int) -> bytes:
    return FRAME.pack(length >> 16, length & 0xFFFF, ftype, flags, stream_id)


def hpack_int(value: int, prefix_bits: int, first: int = 0) -> bytes:
    """Encode an HPACK integer with an N-bit prefix; ``first`` holds the pattern bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def hpack_literal(name: bytes, value: bytes) -> bytes:
    """A header as "literal without indexing, new name", no Huffman: stateless to emit."""
    return b"\x00" + hpack_int(len(name), 7) + name + hpack_int(len(value), 7) + value
