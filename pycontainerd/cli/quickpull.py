"""``pcd pull`` in one call, without loading gRPC: the daemon's Pull service over a bare
HTTP/2 connection.

The daemon does the whole pull (:mod:`pycontainerd.transfer.pull`); the command only
sends the request and shows the progress it streams back. Importing asyncio, gRPC and
the SDK costs ``pcd`` over 100 ms before its first byte — as long as a quarter of a
200 MB pull — so this path speaks the little HTTP/2 one unary-request, server-streaming
call needs: the preface, SETTINGS (and their acknowledgement), one HEADERS and DATA
out; DATA, HEADERS and trailers back, with PING answered and flow control credited.

Whatever it does not expect — no such socket, a daemon without the Pull service
(containerd answers UNIMPLEMENTED), a header block it cannot read — makes it return
None before any progress was shown, and ``pcd`` then pulls through the SDK as before,
which also gives every error its usual wording.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote

from pycontainerd.api.services.pull.v1 import pull_pb2
from pycontainerd.cli.commands import registry_settings
from pycontainerd.cli.progress import ProgressDisplay
from pycontainerd.client.reference import parse
from pycontainerd.errdefs import InvalidArgument, PycdError
from pycontainerd.grpc.h2wire import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    frame,
    hpack_literal,
)

if TYPE_CHECKING:
    import argparse

__all__ = ["quick_pull"]

PATH = b"/pycontainerd.services.pull.v1.Pull/Pull"
_WINDOW_SIZE = 1 << 24
_MAX_FRAME = 16384
_UNIMPLEMENTED = 12
# The static-table entries our daemon's responses use; anything else is ignored.
_STATIC = {8: (b":status", b"200"), 31: (b"content-type", b"")}


class _Fallback(Exception):
    """Something this client does not handle: pull through the SDK instead."""


def _decode_headers(block: bytes) -> dict[bytes, bytes]:
    """A header block as our daemon writes it: static indexes and plain literals."""
    out: dict[bytes, bytes] = {}
    pos = 0

    def integer(bits: int) -> int:
        nonlocal pos
        value = block[pos] & ((1 << bits) - 1)
        pos += 1
        if value < (1 << bits) - 1:
            return value
        shift = 0
        while True:
            b = block[pos]
            pos += 1
            value += (b & 0x7F) << shift
            if not b & 0x80:
                return value
            shift += 7

    def string() -> bytes:
        nonlocal pos
        if block[pos] & 0x80:
            raise _Fallback("Huffman-coded header")
        n = integer(7)
        pos += n
        return block[pos - n : pos]

    while pos < len(block):
        b = block[pos]
        if b & 0x80:
            name, value = _STATIC.get(integer(7), (b"", b""))
        elif b & 0xE0 == 0x20:
            integer(5)  # a dynamic table size update
            continue
        else:
            index = integer(6 if b & 0x40 else 4)
            name = _STATIC.get(index, (b"", b""))[0] if index else string()
            value = string()
        out[name] = value
    return out


class _Call:
    """One Pull call on its own connection."""

    def __init__(self, address: str, namespace: str, request: bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(address)
        except OSError as exc:
            self.sock.close()
            raise _Fallback(str(exc)) from None
        headers = b"".join(
            hpack_literal(k, v)
            for k, v in (
                (b":method", b"POST"), (b":scheme", b"http"), (b":path", PATH),
                (b":authority", b"localhost"), (b"content-type", b"application/grpc"),
                (b"te", b"trailers"), (b"containerd-namespace", namespace.encode()),
            )
        )  # fmt: skip
        message = b"\x00" + struct.pack(">I", len(request)) + request
        out = [
            PREFACE,
            frame(SETTINGS, 0, 0, struct.pack(">HIHI", 2, 0, 4, _WINDOW_SIZE)),
            frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", _WINDOW_SIZE - 65535)),
            frame(HEADERS, END_HEADERS, 1, headers),
        ]
        for i in range(0, len(message), _MAX_FRAME):
            last = i + _MAX_FRAME >= len(message)
            out.append(frame(DATA, END_STREAM if last else 0, 1, message[i : i + _MAX_FRAME]))
        self.sock.sendall(b"".join(out))
        self._buf = bytearray()
        self._data = bytearray()
        self._block = bytearray()
        self._credit = 0

    def close(self) -> None:
        self.sock.close()

    def _read(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise _Fallback("the daemon closed the connection")
            self._buf += chunk
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def messages(self) -> tuple[list[bytes], dict[bytes, bytes] | None]:
        """Read frames up to the next messages; (messages, trailers once the call ends)."""
        while True:
            head = self._read(9)
            length = int.from_bytes(head[:3], "big")
            ftype, flags = head[3], head[4]
            stream = int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = self._read(length)
            if ftype in (DATA, HEADERS) and flags & PADDED:
                payload = payload[1 : len(payload) - payload[0]]
            if ftype == SETTINGS and not flags & ACK:
                self.sock.sendall(frame(SETTINGS, ACK, 0))
            elif ftype == PING and not flags & ACK:
                self.sock.sendall(frame(PING, ACK, 0, payload))
            elif ftype in (GOAWAY, RST_STREAM):
                raise _Fallback("the daemon ended the call")
            elif ftype == DATA and stream == 1:
                self._data += payload
                self._credit += length
                if self._credit >= _WINDOW_SIZE // 2:
                    inc = struct.pack(">I", self._credit)
                    self.sock.sendall(
                        frame(WINDOW_UPDATE, 0, 0, inc) + frame(WINDOW_UPDATE, 0, 1, inc)
                    )
                    self._credit = 0
                found = self._split()
                if found:
                    return found, None
            elif ftype in (HEADERS, CONTINUATION) and stream == 1:
                if ftype == HEADERS and flags & PRIORITY_FLAG:
                    payload = payload[5:]
                self._block += payload
                if flags & END_HEADERS:
                    headers = _decode_headers(bytes(self._block))
                    self._block.clear()
                    if b"grpc-status" in headers:
                        return self._split(), headers

    def _split(self) -> list[bytes]:
        out = []
        while len(self._data) >= 5:
            if self._data[0]:
                raise _Fallback("a compressed message")
            size = int.from_bytes(self._data[1:5], "big")
            if len(self._data) < 5 + size:
                break
            out.append(bytes(self._data[5 : 5 + size]))
            del self._data[: 5 + size]
        return out


def _request(args: argparse.Namespace, reference: str, host: str) -> bytes:
    cfg = registry_settings(args, host)
    ca = Path(cfg["ca_file"]).read_text() if cfg["ca_file"] else ""
    req = pull_pb2.PullRequest(reference=reference, unpack=True, concurrency=4)
    req.hosts.add(
        host=host, insecure=cfg["insecure"], ca_pem=ca, username=cfg["username"],
        password=cfg["password"],
    )  # fmt: skip
    return req.SerializeToString()


def _error(code: int, details: str) -> PycdError:
    import grpc  # only now, for the status code's class

    from pycontainerd.errdefs import from_status

    status = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return from_status(status, details)


def quick_pull(address: str, namespace: str, args: argparse.Namespace) -> int | None:
    """Run ``pcd pull``; None when it must go through the SDK instead."""
    try:
        ref = parse(args.reference)
    except InvalidArgument:
        return None  # the SDK path words the error
    try:
        call = _Call(address, namespace, _request(args, str(ref), ref.host))
    except (_Fallback, OSError):
        return None
    display: ProgressDisplay | None = None
    name = ""
    try:
        while True:
            found, trailers = call.messages()
            for data in found:
                msg = pull_pb2.PullProgress.FromString(data)
                if msg.kind == "image":
                    name = msg.image_name
                    digest = msg.image_target.digest
                    continue
                if display is None:
                    display = ProgressDisplay(sys.stderr)
                display(msg)  # type: ignore[arg-type]  # (the same fields as Progress)
            if trailers is not None:
                break
    except (_Fallback, OSError):
        if display is None:
            return None
        raise
    finally:
        call.close()
        if display is not None:
            display.close()
    status = int(trailers.get(b"grpc-status", b"2"))
    if status == _UNIMPLEMENTED and display is None and not name:
        return None  # no Pull service here
    if status != 0:
        details = unquote(trailers.get(b"grpc-message", b"").decode("utf-8", "replace"))
        exc = _error(status, details)
        raise type(exc)(f"pull {ref}: {exc.message or exc}")
    if not name:
        return None
    print(f"Pulled {name} ({digest})", file=sys.stderr)
    print(name)
    with contextlib.suppress(OSError):
        sys.stdout.flush()
    return 0
