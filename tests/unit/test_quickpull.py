"""``pcd pull``'s bare HTTP/2 client against a scripted server on a unix socket: frames
split and padded, a PING to answer, trailers; a server without the Pull service, or
one whose headers it cannot read, sends ``pcd`` back to the SDK (None)."""

from __future__ import annotations

import argparse
import socket
import struct
import threading
from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.services.pull.v1 import pull_pb2
from pycontainerd.cli import quickpull
from pycontainerd.errdefs import NotFound
from pycontainerd.grpc.h2wire import PREFACE, frame, hpack_literal

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from pathlib import Path


def grpc_message(msg: pull_pb2.PullProgress) -> bytes:
    data = msg.SerializeToString()
    return b"\x00" + struct.pack(">I", len(data)) + data


def read_frames(conn: socket.socket) -> list[tuple[int, int, bytes]]:
    """Everything the client sent: the preface, then frames up to its END_STREAM DATA."""
    buf = b""
    while len(buf) < len(PREFACE):
        buf += conn.recv(65536)
    assert buf.startswith(PREFACE)
    buf = buf[len(PREFACE) :]
    frames = []
    while True:
        while len(buf) < 9 or len(buf) < 9 + int.from_bytes(buf[:3], "big"):
            buf += conn.recv(65536)
        n = int.from_bytes(buf[:3], "big")
        ftype, flags, payload = buf[3], buf[4], buf[9 : 9 + n]
        buf = buf[9 + n :]
        frames.append((ftype, flags, payload))
        if ftype == 0 and flags & 1:
            return frames


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Callable[[bytes], tuple[str, dict[str, object]]]]:
    """serve(reply): a socket whose one client gets ``reply`` after its request."""
    threads: list[threading.Thread] = []

    def serve(reply: bytes) -> tuple[str, dict[str, object]]:
        path = str(tmp_path / f"s{len(threads)}.sock")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(path)
        lsock.listen(1)
        seen: dict[str, object] = {}
        done = threading.Event()
        seen["done"] = done

        def run() -> None:
            conn, _ = lsock.accept()
            with conn, lsock:
                seen["frames"] = read_frames(conn)
                conn.sendall(reply)
                rest = b""
                conn.settimeout(2)
                try:
                    while chunk := conn.recv(65536):
                        rest += chunk
                except OSError:
                    pass
                seen["after"] = rest
                done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        threads.append(t)
        return path, seen

    yield serve
    for t in threads:
        t.join(5)


def args(reference: str = "127.0.0.1:5000/a/b:1") -> argparse.Namespace:
    return argparse.Namespace(
        reference=reference, insecure_registry=["127.0.0.1:5000"], ca_file=None,
        username="", password="",
    )  # fmt: skip


def test_progress_image_and_trailers(server, capsys: pytest.CaptureFixture[str]) -> None:
    progress = grpc_message(pull_pb2.PullProgress(kind="start", digest="sha256:aa", total=9))
    image = pull_pb2.PullProgress(kind="image", image_name="127.0.0.1:5000/a/b:1")
    image.image_target.digest = "sha256:bb"
    body = progress + grpc_message(image)
    padded = bytes((3,)) + body[:7] + b"\0\0\0"  # PADDED, three bytes of padding
    reply = (
        frame(4, 0, 0)  # SETTINGS
        + frame(6, 0, 0, b"12345678")  # PING: answered
        + frame(1, 4, 1, b"\x88" + hpack_literal(b"content-type", b"application/grpc"))
        + frame(0, 0x8, 1, padded)
        + frame(0, 0, 1, body[7:])
        + frame(1, 5, 1, hpack_literal(b"grpc-status", b"0"))
    )
    path, seen = server(reply)
    assert quickpull.quick_pull(path, "ns1", args()) == 0
    out = capsys.readouterr()
    assert out.out.strip() == "127.0.0.1:5000/a/b:1"
    assert "Pulled 127.0.0.1:5000/a/b:1 (sha256:bb)" in out.err
    frames = seen["frames"]
    assert isinstance(frames, list)
    headers = next(p for t, _, p in frames if t == 1)
    assert quickpull.PATH in headers and b"ns1" in headers
    data = b"".join(p for t, _, p in frames if t == 0)
    req = pull_pb2.PullRequest.FromString(data[5:])
    assert req.reference == "127.0.0.1:5000/a/b:1" and req.unpack
    assert [(h.host, h.insecure) for h in req.hosts] == [("127.0.0.1:5000", True)]
    done = seen["done"]
    assert isinstance(done, threading.Event) and done.wait(5)
    after = seen["after"]
    assert isinstance(after, bytes)
    assert frame(4, 1, 0) in after and frame(6, 1, 0, b"12345678") in after


def test_errors_and_fallbacks(server) -> None:
    # A failure of the pull: the daemon's error, worded as the SDK path words it.
    trailers = hpack_literal(b"grpc-status", b"5") + hpack_literal(
        b"grpc-message", b"manifest%20x: not found"
    )
    path, _ = server(frame(4, 0, 0) + frame(1, 5, 1, b"\x88" + trailers))
    with pytest.raises(NotFound) as err:
        quickpull.quick_pull(path, "ns", args())
    assert str(err.value) == "pull 127.0.0.1:5000/a/b:1: manifest x: not found"
    # No Pull service (a trailers-only answer, as grpc-go writes it): back to the SDK.
    path, _ = server(frame(4, 0, 0) + frame(1, 5, 1, hpack_literal(b"grpc-status", b"12")))
    assert quickpull.quick_pull(path, "ns", args()) is None
    # A Huffman-coded header block: back to the SDK, nothing shown.
    path, _ = server(frame(4, 0, 0) + frame(1, 5, 1, b"\x00\x81\xff\x01a"))
    assert quickpull.quick_pull(path, "ns", args()) is None
    # No daemon at all, or a reference the SDK path must word: back to the SDK too.
    assert quickpull.quick_pull("/nonexistent.sock", "ns", args()) is None
    assert quickpull.quick_pull("/nonexistent.sock", "ns", args("UPPER/x")) is None
