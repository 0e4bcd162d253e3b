"""Port forwarding into a pod, over either streaming transport.

Each forwarded TCP connection is a ``PortPipe`` on the client's side: over WebSocket a pair
of channels (2i data, 2i+1 errors) per port named in the request; over SPDY a pair of
streams (``streamtype`` data and error, tied by ``requestid``, naming ``port``) per
connection the client makes. The pod side is a socket created inside the pod's network
namespace and connected to 127.0.0.1:<port>; ``forward_port`` copies between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from typing import TYPE_CHECKING, Protocol

from pycontainerd.cri.spdy import PROTOCOL_ERROR
from pycontainerd.cri.websocket import BINARY
from pycontainerd.errdefs import InvalidArgument, NotFound
from pycontainerd.network import run_in_netns

if TYPE_CHECKING:
    from pycontainerd.cri.runtime import Sandbox
    from pycontainerd.cri.spdy import Connection, Stream
    from pycontainerd.cri.websocket import WebSocket

__all__ = [
    "PortPipe",
    "forward_port",
    "forward_spdy",
    "forward_websocket",
    "query_ports",
    "valid_port_stream",
]

log = logging.getLogger(__name__)

CHUNK = 1 << 16


class PortPipe(Protocol):
    """One forwarded connection's client side."""

    half_close: bool  # can say "no more data" one way (SPDY's FIN) and go on the other

    async def read(self) -> bytes:
        """Data from the client; b'' once it finished sending."""

    async def write(self, data: bytes) -> None:
        """Data to the client; ConnectionError once it is gone."""

    async def fail(self, message: str) -> None:
        """Report an error to the client."""

    async def close_write(self) -> None:
        """The pod side finished sending."""


# Seconds one direction of a forwarded connection may go on after the other ended.
HALF_CLOSE_GRACE = 1.0


async def forward_port(sb: Sandbox, port: int, pipe: PortPipe) -> None:
    """Connect to ``port`` in the pod and copy both ways.

    Each side's end of data is passed on as a half close; once one direction is done the
    other has ``HALF_CLOSE_GRACE`` seconds to finish (a server may shut its side down and
    still read: busybox ``nc`` does as soon as its stdin is empty). A pipe without half
    close (WebSocket) ends when the pod side does.
    """
    try:
        r, w = await _connect_in(sb.meta.netns, port)
    except OSError as exc:
        with contextlib.suppress(ConnectionError):
            await pipe.fail(f"failed to connect to localhost:{port} in pod {sb.meta.id}: {exc}")
        return

    async def to_pod() -> None:
        while chunk := await pipe.read():
            w.write(chunk)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()

    async def from_pod() -> None:
        while chunk := await r.read(CHUNK):
            await pipe.write(chunk)
        await pipe.close_write()

    inbound, outbound = asyncio.create_task(to_pod()), asyncio.create_task(from_pod())
    try:
        if not pipe.half_close:
            await asyncio.wait({outbound})
        else:
            # When one direction ends, the other gets a moment to finish, as containerd
            # does: kubectl before 1.30 ends its side only after the error stream closed,
            # which happens when we return, so waiting for both would never end.
            done, _ = await asyncio.wait({inbound, outbound}, return_when=asyncio.FIRST_COMPLETED)
            if len(done) < 2:
                await asyncio.wait({inbound, outbound}, timeout=HALF_CLOSE_GRACE)
    finally:
        for t in (inbound, outbound):
            t.cancel()
        for res in await asyncio.gather(inbound, outbound, return_exceptions=True):
            if isinstance(res, Exception) and not isinstance(res, ConnectionError | OSError):
                log.warning("forwarding port %d of pod %s failed: %r", port, sb.meta.id, res)
            elif isinstance(res, OSError):
                log.debug("forwarding port %d of pod %s: %s", port, sb.meta.id, res)
        w.close()


# ---------------------------------------------------------------------- WebSocket


async def forward_websocket(ws: WebSocket, sb: Sandbox, ports: list[int]) -> None:
    """Forward ``ports`` (channels 2i and 2i+1) until all are done or the client leaves."""
    if not ports:
        raise InvalidArgument("no port to forward")
    pipes = [_WSPortPipe(ws, 2 * i) for i in range(len(ports))]
    for pipe, port in zip(pipes, ports, strict=True):
        # Each channel starts with its port number, little endian.
        prefix = struct.pack("<H", port)
        await ws.send(bytes([pipe.channel]) + prefix)
        await ws.send(bytes([pipe.channel + 1]) + prefix)

    async def forward_all() -> None:
        await asyncio.gather(*(forward_port(sb, p, q) for p, q in zip(ports, pipes, strict=True)))

    forwards = asyncio.create_task(forward_all())
    inbound = asyncio.create_task(_ws_demux(ws, {p.channel: p for p in pipes}))
    try:
        await asyncio.wait({inbound, forwards}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        inbound.cancel()
        forwards.cancel()
        await asyncio.gather(inbound, forwards, return_exceptions=True)


class _WSPortPipe:
    def __init__(self, ws: WebSocket, channel: int) -> None:
        self.ws = ws
        self.channel = channel
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue(16)  # bounded: pushes back
        self.done = False
        self.half_close = False

    async def read(self) -> bytes:
        return await self.inbox.get()

    async def write(self, data: bytes) -> None:
        await self.ws.send(bytes([self.channel]) + data)

    async def fail(self, message: str) -> None:
        await self.ws.send(bytes([self.channel + 1]) + message.encode())

    async def close_write(self) -> None:
        self.done = True  # the channel protocol has no half close


async def _ws_demux(ws: WebSocket, pipes: dict[int, _WSPortPipe]) -> None:
    while (msg := await ws.recv()) is not None:
        op, data = msg
        pipe = pipes.get(data[0]) if op == BINARY and len(data) > 1 else None
        if pipe is not None and not pipe.done:
            await pipe.inbox.put(data[1:])


# ---------------------------------------------------------------------- SPDY


async def forward_spdy(conn: Connection, sb: Sandbox) -> None:
    """Pair the client's data and error streams by request id and forward each pair, until
    the client opens no more."""
    pairs: dict[str, dict[str, Stream]] = {}
    tasks: set[asyncio.Task[None]] = set()
    try:
        while (stream := await conn.accept()) is not None:
            kind = stream.header("streamtype")
            # Old clients send no request id: like kubelet, derive one from the stream ids
            # (error stream n, then data stream n + 2).
            rid = stream.header("requestid") or str(stream.id - (kind == "data") * 2)
            pair = pairs.setdefault(rid, {})
            if kind in pair:
                stream.reset(PROTOCOL_ERROR)
                continue
            pair[kind] = stream
            if len(pair) == 2:
                del pairs[rid]
                task = asyncio.create_task(_forward_pair(sb, pair["data"], pair["error"]))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def valid_port_stream(headers: dict[str, str]) -> str | None:
    """Why a port-forward stream with ``headers`` is refused (None: it is not)."""
    kind, port = headers.get("streamtype", ""), headers.get("port", "")
    if kind not in ("data", "error"):
        return f"invalid stream type {kind!r}"
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"invalid port {port!r}"
    return None


class _SPDYPortPipe:
    def __init__(self, data: Stream, error: Stream) -> None:
        self.data = data
        self.error = error
        self.half_close = True

    async def read(self) -> bytes:
        return await self.data.read()

    async def write(self, data: bytes) -> None:
        await self.data.write(data)

    async def fail(self, message: str) -> None:
        await self.error.write(message.encode())

    async def close_write(self) -> None:
        await self.data.close()


async def _forward_pair(sb: Sandbox, data: Stream, error: Stream) -> None:
    try:
        await forward_port(sb, int(data.header("port")), _SPDYPortPipe(data, error))
    finally:
        await data.close()
        await error.close()


# ---------------------------------------------------------------------- helpers


def query_ports(values: list[str]) -> list[int]:
    """The ports of ``?port=`` query values (each may be a comma-separated list)."""
    ports: list[int] = []
    for v in values:
        for item in v.split(","):
            if not item.strip():
                continue
            try:
                p = int(item)
            except ValueError:
                raise InvalidArgument(f"invalid port {item!r}") from None
            if not 0 < p < 65536:
                raise InvalidArgument(f"invalid port {p}")
            ports.append(p)
    return ports


async def _connect_in(netns: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP connection to 127.0.0.1:``port`` inside ``netns`` (host network if empty).

    The socket is made and connected on a thread inside the namespace; it stays bound to
    that namespace after the thread has left, so the loop can drive it from here.
    """

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            s.setblocking(False)
        except BaseException:
            s.close()
            raise
        return s

    try:
        sock = await (run_in_netns(netns, connect) if netns else asyncio.to_thread(connect))
    except NotFound as exc:
        raise OSError(str(exc)) from exc
    return await asyncio.open_connection(sock=sock)
