"""The CRI streaming server: where Exec, Attach and PortForward URLs lead.

The gRPC calls only check the request and hand out a URL ``http://<addr>:<port>/<kind>/
<token>``; the token is random, single use and expires after a minute, as in containerd's
streaming server. The client (kubelet's proxy, kubectl, crictl) then upgrades that URL's
HTTP connection to one of two transports:

* WebSocket. exec / attach speak ``v5.channel.k8s.io`` or ``v4.channel.k8s.io``: every
  binary message starts with a channel byte — 0 stdin, 1 stdout, 2 stderr, 3 error (a JSON
  ``metav1.Status`` when the command ends), 4 resize (``{"Width":w,"Height":h}``); v5 adds
  channel 255, whose message ``[255, n]`` closes stream ``n`` (stdin's EOF). portforward
  speaks ``v4.channel.k8s.io`` (or no subprotocol; ``portforward.k8s.io`` is taken as a
  synonym): for the i-th port (``?port=`` in the URL, else the ports of the request)
  channel 2i carries data and 2i+1 errors; the server first sends the port number (2
  bytes, little endian) on both.
* SPDY/3.1 (``spdy.py``), chosen with ``X-Stream-Protocol-Version``. exec / attach
  (``v5``/``v4``/``v3``/``v2.channel.k8s.io``): the client opens one stream per channel,
  named by its ``streamtype`` header (error, stdin, stdout, stderr, resize); the session
  starts once every stream the request asks for is open. The error stream gets the JSON
  status (v4, v5) or, for a failure only, its message (v2, v3); resize carries a sequence
  of JSON sizes. portforward (``portforward.k8s.io``): each forwarded connection is a pair
  of streams, ``streamtype`` data and error, tied by ``requestid`` and naming ``port``.

Both transports feed one implementation: exec and attach see a ``Channels`` (send on a
channel, receive stdin/resize/close events) and each forwarded connection a ``PortPipe``.
The connection to 127.0.0.1:<port> is made from a socket created inside the pod's network
namespace. Attach limits: the container's output is read back from its CRI log file (the
log writer owns the output FIFOs), so it needs a log path; stdin cannot be attached
(containers are started without a stdin FIFO).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, BinaryIO

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.client import TaskIO
from pycontainerd.cri.channels import (
    CLOSE_STREAM,
    ERROR,
    RESIZE,
    STDERR,
    STDIN,
    STDOUT,
    SPDYChannels,
    WebSocketChannels,
    command_streams,
    is_spdy_upgrade,
    valid_command_stream,
)
from pycontainerd.cri.portforward import (
    forward_spdy,
    forward_websocket,
    query_ports,
    valid_port_stream,
)
from pycontainerd.cri.spdy import Connection
from pycontainerd.cri.websocket import (
    HTTPRequest,
    ProtocolError,
    WebSocket,
    read_request,
    send_response,
)
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument, PycdError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    from pycontainerd.client.tasks import Process
    from pycontainerd.cri.channels import Channels
    from pycontainerd.cri.runtime import CRIContainer, CRIRuntime

__all__ = ["SPDY_STREAM_PROTOCOLS", "STREAM_PROTOCOLS", "TOKEN_TTL", "StreamServer", "exit_status"]

log = logging.getLogger(__name__)

TOKEN_TTL = 60.0
STREAM_PROTOCOLS = ("v5.channel.k8s.io", "v4.channel.k8s.io")
# kubelet's WebSocket port-forward names its channel protocol v4.channel.k8s.io (or none);
# portforward.k8s.io, SPDY's name for it, is accepted too.
PORTFORWARD_PROTOCOLS = ("v4.channel.k8s.io", "portforward.k8s.io")
# Over SPDY kubelet serves v5 as v4 (v5's close signal is a WebSocket matter), v3 as v4
# without the JSON status, v2 as v3 without resizing.
SPDY_STREAM_PROTOCOLS = (
    "v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io",
)  # fmt: skip
SPDY_PORTFORWARD_PROTOCOLS = ("portforward.k8s.io",)
# How long output may still trickle in after the process exited (a background child can
# hold the FIFO open for ever).
OUTPUT_GRACE = 2.0

Request = api_pb2.ExecRequest | api_pb2.AttachRequest | api_pb2.PortForwardRequest


def exit_status(code: int, cmd: list[str] | None = None) -> bytes:
    """The ``metav1.Status`` kubectl reads from the error channel when a process ends."""
    if code == 0:
        return json.dumps({"metadata": {}, "status": "Success"}).encode()
    what = f"error executing command {cmd!r}, " if cmd else ""
    doc = {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: {what}exit code {code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]},
    }
    return json.dumps(doc).encode()


def _failure(message: str) -> bytes:
    return json.dumps(
        {"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError"}
    ).encode()


@dataclass(slots=True)
class _Pending:
    kind: str
    request: Request
    expires: float


class StreamServer:
    """The HTTP server behind the streaming URLs (start it before handing any out)."""

    def __init__(self, rt: CRIRuntime, address: str = "127.0.0.1", port: int = 0) -> None:
        self.rt = rt
        self.address = address
        self.port = port
        self._pending: dict[str, _Pending] = {}
        self._server: asyncio.Server | None = None
        self._start_lock = asyncio.Lock()
        self._sessions: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Listen (idempotent); raises OSError when the address cannot be bound."""
        async with self._start_lock:
            if self._server is not None:
                return
            self._server = await asyncio.start_server(self._serve, self.address, self.port)
            self.port = self._server.sockets[0].getsockname()[1]
            log.info("CRI streaming server listening on %s:%d", self.address, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._sessions):
            t.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)

    @property
    def base_url(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"http://{host}:{self.port}"

    # ------------------------------------------------------------------ URLs

    async def url(self, kind: str, request: Request) -> str:
        """Register ``request`` under a fresh token; the URL that redeems it."""
        await self.start()
        now = time.monotonic()
        for tok in [t for t, p in self._pending.items() if p.expires < now]:
            del self._pending[tok]
        token = secrets.token_urlsafe(12)
        self._pending[token] = _Pending(kind, request, now + TOKEN_TTL)
        return f"{self.base_url}/{kind}/{token}"

    async def exec_url(self, req: api_pb2.ExecRequest) -> str:
        await self.rt.ready()
        c = self.rt.container(req.container_id)
        if c.status.state != api_pb2.CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.meta.id} is not running")
        if not req.cmd:
            raise InvalidArgument("exec command is empty")
        _check_streams(req.stdin, req.stdout, req.stderr, req.tty)
        fixed = api_pb2.ExecRequest()
        fixed.CopyFrom(req)
        fixed.container_id = c.meta.id
        return await self.url("exec", fixed)

    async def attach_url(self, req: api_pb2.AttachRequest) -> str:
        await self.rt.ready()
        c = self.rt.container(req.container_id)
        if c.status.state != api_pb2.CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.meta.id} is not running")
        _check_streams(req.stdin, req.stdout, req.stderr, req.tty)
        if req.stdin:
            raise InvalidArgument("attaching stdin is not supported by this runtime")
        fixed = api_pb2.AttachRequest()
        fixed.CopyFrom(req)
        fixed.container_id = c.meta.id
        return await self.url("attach", fixed)

    async def port_forward_url(self, req: api_pb2.PortForwardRequest) -> str:
        await self.rt.ready()
        sb = self.rt.sandbox(req.pod_sandbox_id)
        if not sb.ready:
            raise FailedPrecondition(f"sandbox {sb.meta.id} is not ready")
        if any(not 0 < p < 65536 for p in req.port):
            raise InvalidArgument(f"invalid port in {list(req.port)}")
        fixed = api_pb2.PortForwardRequest(pod_sandbox_id=sb.meta.id, port=req.port)
        return await self.url("portforward", fixed)

    # ------------------------------------------------------------------ HTTP

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._sessions.add(task)
        try:
            await self._handle(reader, writer)
        except ProtocolError as exc:
            log.debug("streaming client broke the protocol: %s", exc)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception:
            log.exception("streaming session failed")
        finally:
            self._sessions.discard(task)
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req = await read_request(reader)
        parts = req.path.strip("/").split("/")
        if len(parts) != 2 or parts[0] not in ("exec", "attach", "portforward"):
            await send_response(writer, 404, "Not Found", "no such streaming endpoint\n")
            return
        pending = self._pending.pop(parts[1], None)
        if pending is None or pending.kind != parts[0] or pending.expires < time.monotonic():
            await send_response(writer, 404, "Not Found", "unknown or expired token\n")
            return
        if is_spdy_upgrade(req) and req.method in ("GET", "POST"):
            await self._handle_spdy(req, reader, writer, pending.request)
            return
        if req.method != "GET" or not req.is_websocket:
            msg = "expected a WebSocket or SPDY/3.1 upgrade\n"
            await send_response(writer, 400, "Bad Request", msg)
            return
        wanted = PORTFORWARD_PROTOCOLS if pending.kind == "portforward" else STREAM_PROTOCOLS
        offered = req.header_list("sec-websocket-protocol")
        proto = next((p for p in offered if p in wanted), None)
        if proto is None and not offered and pending.kind == "portforward":
            proto = ""
        if proto is None:
            await send_response(
                writer, 400, "Bad Request", f"supported subprotocols: {', '.join(wanted)}\n"
            )
            return
        ws = await WebSocket.accept(req, reader, writer, proto)
        if isinstance(pending.request, api_pb2.PortForwardRequest):
            try:
                sb = self.rt.sandbox(pending.request.pod_sandbox_id)
                ports = query_ports(req.query.get("port", [])) or list(pending.request.port)
                await forward_websocket(ws, sb, ports)
            except PycdError as exc:
                with contextlib.suppress(ConnectionError):
                    await ws.send(bytes([ERROR]) + _failure(str(exc)))
            finally:
                await ws.close()
        else:
            await self._remote_command(WebSocketChannels(ws), pending.request)

    async def _handle_spdy(
        self,
        req: HTTPRequest,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        request: Request,
    ) -> None:
        pf = isinstance(request, api_pb2.PortForwardRequest)
        wanted = SPDY_PORTFORWARD_PROTOCOLS if pf else SPDY_STREAM_PROTOCOLS
        # Like kubelet: the client's order of preference wins among what we speak.
        offered = req.header_list("x-stream-protocol-version")
        proto = next((p for p in offered if p in wanted), None)
        if proto is None:
            msg = f"unable to upgrade: X-Stream-Protocol-Version must be one of {list(wanted)}\n"
            await send_response(writer, 403, "Forbidden", msg)
            return
        writer.write(
            "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
            f"X-Stream-Protocol-Version: {proto}\r\n\r\n".encode()
        )
        await writer.drain()
        conn = Connection(reader, writer, valid_port_stream if pf else valid_command_stream)
        try:
            if isinstance(request, api_pb2.PortForwardRequest):
                await forward_spdy(conn, self.rt.sandbox(request.pod_sandbox_id))
                return
            streams = await command_streams(conn, request, resize=proto != "v2.channel.k8s.io")
            if streams is not None:
                chans = SPDYChannels(conn, streams, json_status=proto in SPDY_STREAM_PROTOCOLS[:2])
                await self._remote_command(chans, request)
        finally:
            await conn.close()

    async def _remote_command(
        self, chans: Channels, request: api_pb2.ExecRequest | api_pb2.AttachRequest
    ) -> None:
        """Run an exec or attach session over ``chans``, whatever carries them."""
        try:
            if isinstance(request, api_pb2.ExecRequest):
                await self._exec(chans, request)
            else:
                await self._attach(chans, request)
        except PycdError as exc:
            with contextlib.suppress(ConnectionError):
                await chans.send(ERROR, _failure(str(exc)))
        finally:
            await chans.close()

    # ------------------------------------------------------------------ exec

    async def _exec(self, chans: Channels, req: api_pb2.ExecRequest) -> None:
        rt = self.rt
        c = rt.container(req.container_id)
        task = await (await rt.client.load_container(c.meta.id)).task()
        exec_id = secrets.token_hex(16)
        stdin: asyncio.Queue[bytes | None] = asyncio.Queue()
        io = await TaskIO.create(
            exec_id,
            stdin=_drain_queue(stdin) if req.stdin else None,
            # runc's shim wants both output FIFOs (a terminal has no stderr): unwanted
            # output is read and dropped, as containerd's CRI does.
            stdout=_sink(chans, STDOUT) if req.stdout else _discard,
            stderr=None if req.tty else _sink(chans, STDERR) if req.stderr else _discard,
            capture=False,
            terminal=req.tty,
        )
        proc = await task.exec(exec_id, list(req.cmd), io=io, tty=req.tty)
        waiter = asyncio.ensure_future(proc.wait())
        pump: asyncio.Task[None] | None = None
        try:
            await _hello(chans, req.stdout, req.stderr and not req.tty)
            await proc.start()
            pump = asyncio.create_task(self._client_input(chans, proc, stdin, req.tty))
            done, _ = await asyncio.wait({waiter, pump}, return_when=asyncio.FIRST_COMPLETED)
            if waiter not in done:
                # The client went away first: nobody is left to read, stop the command.
                with contextlib.suppress(PycdError):
                    await proc.kill(signal.SIGKILL)
            status = await waiter
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(io.wait(), OUTPUT_GRACE)
            with contextlib.suppress(ConnectionError):
                await chans.send(ERROR, exit_status(status.code, list(req.cmd)))
        finally:
            if pump is not None:
                pump.cancel()
            if not waiter.done():
                with contextlib.suppress(PycdError):
                    await proc.kill(signal.SIGKILL)
            with contextlib.suppress(PycdError):
                await proc.delete(force=True)
            waiter.cancel()

    async def _client_input(
        self, chans: Channels, proc: Process, stdin: asyncio.Queue[bytes | None], tty: bool
    ) -> None:
        """Route the client's messages until it closes: stdin, resizes, stream closes."""
        closer: asyncio.Task[None] | None = None

        def end_stdin() -> None:
            nonlocal closer
            if closer is None and proc.io is not None and proc.io.stdin_path:
                stdin.put_nowait(None)
                closer = asyncio.create_task(_close_stdin(proc))

        try:
            while (msg := await chans.recv()) is not None:
                ch, body = msg
                if ch == STDIN and closer is None:
                    stdin.put_nowait(body)
                elif ch == RESIZE and tty:
                    await _resize(body, proc.resize)
                elif ch == CLOSE_STREAM and body[:1] == bytes([STDIN]):
                    end_stdin()
            end_stdin()
        finally:
            if closer is not None:
                with contextlib.suppress(PycdError, asyncio.CancelledError):
                    await closer

    # ------------------------------------------------------------------ attach

    async def _attach(self, chans: Channels, req: api_pb2.AttachRequest) -> None:
        c = self.rt.container(req.container_id)
        task = await (await self.rt.client.load_container(c.meta.id)).task()
        await _hello(chans, req.stdout, req.stderr and not req.tty)
        follower = asyncio.create_task(self._follow_log(chans, c, req))
        reader = asyncio.create_task(self._attach_input(chans, task, req.tty))
        try:
            await asyncio.wait({follower, reader}, return_when=asyncio.FIRST_COMPLETED)
            if follower.done():
                follower.result()
                with contextlib.suppress(ConnectionError):
                    await chans.send(ERROR, exit_status(0))
        finally:
            follower.cancel()
            reader.cancel()
            await asyncio.gather(follower, reader, return_exceptions=True)

    async def _attach_input(self, chans: Channels, task: Process, tty: bool) -> None:
        while (msg := await chans.recv()) is not None:
            if msg[0] == RESIZE and tty:
                await _resize(msg[1], task.resize)

    async def _follow_log(
        self, chans: Channels, c: CRIContainer, req: api_pb2.AttachRequest
    ) -> None:
        """Send what the container writes to its log from now on, until it exits."""
        path = c.meta.log_path
        if not path:
            await c.exited.wait()
            return
        # The log writer creates the file on the first output: until then, wait for it
        # and read it from its start.
        f = await asyncio.to_thread(_open_log, path, True)
        while f is None:
            if c.exited.is_set():
                return
            await asyncio.sleep(0.1)
            f = await asyncio.to_thread(_open_log, path, False)
        partial = b""
        try:
            while True:
                exited = c.exited.is_set()
                data = await asyncio.to_thread(f.read)
                if data:
                    lines = (partial + data).split(b"\n")
                    partial = lines.pop()
                    for line in lines:
                        await _send_log_line(chans, line, req)
                elif exited:
                    return
                else:
                    await asyncio.sleep(0.1)
        finally:
            await asyncio.to_thread(f.close)

    # ------------------------------------------------------------------ port forward


# ---------------------------------------------------------------------- transports


# ---------------------------------------------------------------------- helpers


def _check_streams(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> None:
    if not (stdin or stdout or stderr):
        raise InvalidArgument("one of stdin, stdout or stderr must be set")
    if tty and stderr and not stdout:
        raise InvalidArgument("a tty merges stderr into stdout: ask for stdout")


async def _hello(chans: Channels, stdout: bool, stderr: bool) -> None:
    """An empty message on the lowest output channel, as kubelet's server sends, so a
    WebSocket client knows the streams are up (SPDY needs no such thing)."""
    await chans.send(STDOUT if stdout else STDERR if stderr else ERROR, b"")


def _sink(chans: Channels, channel: int) -> Callable[[bytes], Awaitable[None]]:
    async def send(chunk: bytes) -> None:
        with contextlib.suppress(ConnectionError):
            await chans.send(channel, chunk)

    return send


async def _discard(chunk: bytes) -> None:
    pass


async def _drain_queue(q: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (chunk := await q.get()) is not None:
        if chunk:
            yield chunk


async def _close_stdin(proc: Process) -> None:
    with contextlib.suppress(PycdError):
        await proc.close_stdin()


async def _send_log_line(chans: Channels, line: bytes, req: api_pb2.AttachRequest) -> None:
    # <RFC3339Nano> <stream> <P|F> <content>; F ends a line, P is part of a long one. With
    # a tty there is only stdout.
    fields = line.split(b" ", 3)
    if len(fields) < 3:
        return
    stream, tag = fields[1], fields[2]
    content = fields[3] if len(fields) > 3 else b""
    if tag == b"F":
        content += b"\n"
    if stream == b"stdout" and req.stdout:
        await chans.send(STDOUT, content)
    elif stream == b"stderr" and req.stderr:
        await chans.send(STDERR, content)


async def _resize(body: bytes, resize: Callable[[int, int], Awaitable[None]]) -> None:
    try:
        size: Any = json.loads(body)
        width, height = int(size["Width"]), int(size["Height"])
    except (ValueError, KeyError, TypeError):
        log.debug("ignoring malformed resize message %r", body[:100])
        return
    with contextlib.suppress(PycdError):
        await resize(width, height)


def _open_log(path: str, at_end: bool) -> BinaryIO | None:
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed by the follower's finally
    except FileNotFoundError:
        return None
    if at_end:
        f.seek(0, os.SEEK_END)
    return f
