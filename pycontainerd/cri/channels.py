"""The numbered channels of an exec or attach session, over either streaming transport.

Kubernetes' remote command protocols all carry the same five channels — stdin, stdout,
stderr, error (the final ``metav1.Status``) and resize — but frame them differently: the
WebSocket protocols prefix every message with the channel number, SPDY gives each channel
its own stream named by a ``streamtype`` header. ``Channels`` is what the exec and attach
code in ``streaming.py`` sees; ``WebSocketChannels`` and ``SPDYChannels`` implement it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Protocol

from pycontainerd.cri.spdy import PROTOCOL_ERROR
from pycontainerd.cri.websocket import BINARY

if TYPE_CHECKING:
    from pycontainerd.api.cri.runtime.v1 import api_pb2
    from pycontainerd.cri.spdy import Connection, Stream
    from pycontainerd.cri.websocket import HTTPRequest, WebSocket

__all__ = [
    "CLOSE_STREAM",
    "ERROR",
    "RESIZE",
    "STDERR",
    "STDIN",
    "STDOUT",
    "STREAM_TYPES",
    "Channels",
    "SPDYChannels",
    "WebSocketChannels",
    "command_streams",
    "is_spdy_upgrade",
    "valid_command_stream",
]

log = logging.getLogger(__name__)

STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE_STREAM = 0, 1, 2, 3, 4, 255
STREAM_TYPES = {"stdin": STDIN, "stdout": STDOUT, "stderr": STDERR, "error": ERROR}
STREAM_TYPES["resize"] = RESIZE
# How long a SPDY client may take to open the streams its request needs (kubelet: 30 s).
STREAM_CREATION_TIMEOUT = 30.0
MAX_RESIZE_DOC = 4096


class Channels(Protocol):
    """An exec/attach session's channels, whatever the transport."""

    async def send(self, channel: int, data: bytes) -> None:
        """Send on STDOUT/STDERR/ERROR; raises ConnectionError once the client is gone."""

    async def recv(self) -> tuple[int, bytes] | None:
        """The client's next (STDIN, data), (RESIZE, json) or (CLOSE_STREAM, [STDIN]);
        None once it has gone."""

    async def close(self) -> None:
        """End the session with the transport's orderly close."""


class WebSocketChannels:
    """``v4``/``v5.channel.k8s.io``: one channel byte before every binary message."""

    def __init__(self, ws: WebSocket) -> None:
        self.ws = ws

    async def send(self, channel: int, data: bytes) -> None:
        await self.ws.send(bytes([channel]) + data)

    async def recv(self) -> tuple[int, bytes] | None:
        while (msg := await self.ws.recv()) is not None:
            op, data = msg
            if op == BINARY and data:
                return data[0], data[1:]
        return None

    async def close(self) -> None:
        await self.ws.close()


class SPDYChannels:
    """One SPDY stream per channel; the stdin and resize streams feed one event queue.

    ``json_status``: the error stream takes the JSON status (v4, v5); otherwise (v2, v3)
    only a failure's message. Empty sends are dropped: SPDY needs no "streams are up"
    message.
    """

    def __init__(self, conn: Connection, streams: dict[int, Stream], json_status: bool) -> None:
        self.conn = conn
        self.streams = streams
        self.json_status = json_status
        self._events: asyncio.Queue[tuple[int, bytes] | None] = asyncio.Queue()
        self._gone = False
        self._tasks = [asyncio.create_task(self._watch())]
        if STDIN in streams:
            self._tasks.append(asyncio.create_task(self._stdin(streams[STDIN])))
        if RESIZE in streams:
            self._tasks.append(asyncio.create_task(self._resizes(streams[RESIZE])))

    async def send(self, channel: int, data: bytes) -> None:
        stream = self.streams.get(channel)
        if channel == ERROR and not self.json_status:
            status = json.loads(data)
            data = b"" if status.get("status") == "Success" else status["message"].encode()
        if stream is not None and data:
            await stream.write(data)

    async def recv(self) -> tuple[int, bytes] | None:
        if self._gone:
            return None
        event = await self._events.get()
        self._gone = event is None
        return event

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.conn.close()

    async def _watch(self) -> None:
        await self.conn.done.wait()
        self._events.put_nowait(None)

    async def _stdin(self, stream: Stream) -> None:
        while chunk := await stream.read():
            self._events.put_nowait((STDIN, chunk))
        self._events.put_nowait((CLOSE_STREAM, bytes([STDIN])))

    async def _resizes(self, stream: Stream) -> None:
        # A sequence of JSON documents with no framing (kubectl writes them with a Go
        # json.Encoder): decode each one as soon as it is complete.
        decoder = json.JSONDecoder()
        buf = ""
        while chunk := await stream.read():
            buf += chunk.decode("utf-8", "replace")
            while buf := buf.lstrip():
                try:
                    _, end = decoder.raw_decode(buf)
                except ValueError:
                    if len(buf) > MAX_RESIZE_DOC:
                        buf = ""  # never a terminal size: drop it
                    break
                self._events.put_nowait((RESIZE, buf[:end].encode()))
                buf = buf[end:]


async def command_streams(
    conn: Connection, req: api_pb2.ExecRequest | api_pb2.AttachRequest, resize: bool
) -> dict[int, Stream] | None:
    """Wait until the client has opened every stream ``req`` needs, as kubelet does before
    it starts the command; None if the client leaves or takes too long."""
    need = {ERROR}
    need |= {STDIN} if req.stdin else set()
    need |= {STDOUT} if req.stdout else set()
    need |= {STDERR} if req.stderr and not req.tty else set()
    need |= {RESIZE} if req.tty and resize else set()
    streams: dict[int, Stream] = {}
    try:
        async with asyncio.timeout(STREAM_CREATION_TIMEOUT):
            while not need <= streams.keys():
                stream = await conn.accept()
                if stream is None:
                    return None
                ch = STREAM_TYPES[stream.header("streamtype")]  # checked on arrival
                if ch in streams:
                    stream.reset(PROTOCOL_ERROR)
                else:
                    streams[ch] = stream
    except TimeoutError:
        log.info("SPDY client opened only streams %s of %s in time", set(streams), need)
        return None
    return streams


def valid_command_stream(headers: dict[str, str]) -> str | None:
    """Why an exec/attach stream with ``headers`` is refused (None: it is not)."""
    kind = headers.get("streamtype", "")
    return None if kind in STREAM_TYPES else f"unexpected stream type {kind!r}"


def is_spdy_upgrade(req: HTTPRequest) -> bool:
    return "spdy/3.1" in req.headers.get("upgrade", "").lower() and "upgrade" in [
        v.lower() for v in req.header_list("connection")
    ]
