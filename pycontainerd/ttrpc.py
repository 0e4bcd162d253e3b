"""ttrpc over unix sockets, on asyncio: containerd's RPC protocol between daemon and shims.

A frame is a 10-byte header — payload length (uint32, big endian), stream id (uint32),
type (1 request, 2 response), flags — followed by a protobuf ``ttrpc.Request`` or
``ttrpc.Response`` of at most 4 MiB. Clients number their streams with odd ids; each
stream carries one request and its response, and any number are in flight at once.
Metadata travels as key/value pairs (the namespace as ``containerd-namespace-ttrpc``);
errors as a ``google.rpc.Status`` mapped to and from our domain errors.

The server checks its peer's credentials on accept (``SO_PEERCRED``): only the same
effective uid and gid are served, as containerd's ``UnixSocketRequireSameUser``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from pycontainerd.api.ttrpc import ttrpc_pb2
from pycontainerd.errdefs import (
    DeadlineExceeded,
    InvalidArgument,
    PycdError,
    ResourceExhausted,
    Unavailable,
    Unimplemented,
    from_status,
)

if TYPE_CHECKING:
    from google.rpc import status_pb2

__all__ = ["Client", "Method", "Server", "TTRPCError"]

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20
REQUEST = 1
RESPONSE = 2

M = TypeVar("M", bound=Message)
Metadata = Sequence[tuple[str, str]]


class TTRPCError(Unavailable):
    """The connection failed or closed while a call was in flight."""


def _code_of(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, PycdError):
        return exc.code.value[0], str(exc)
    return grpc.StatusCode.UNKNOWN.value[0], str(exc) or type(exc).__name__


def _error_from(status: status_pb2.Status) -> PycdError:
    code = next((c for c in grpc.StatusCode if c.value[0] == status.code), grpc.StatusCode.UNKNOWN)
    return from_status(code, status.message)


class _Conn:
    """Framing over one stream socket: read frames, write frames (one lock for writes)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self._wlock = asyncio.Lock()

    async def read(self) -> tuple[int, int, bytes | None]:
        """One frame; the payload is None when it exceeded the size limit (and was skipped)."""
        head = await self.reader.readexactly(HEADER.size)
        length, sid, mtype, _flags = HEADER.unpack(head)
        if length > MAX_MESSAGE:
            # Skip it: the connection stays usable, the call gets RESOURCE_EXHAUSTED.
            while length:
                chunk = await self.reader.read(min(length, 1 << 20))
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", length)
                length -= len(chunk)
            return sid, mtype, None
        return sid, mtype, await self.reader.readexactly(length)

    async def send(self, sid: int, mtype: int, payload: bytes) -> None:
        if len(payload) > MAX_MESSAGE:
            raise ResourceExhausted(
                f"message length {len(payload)} exceeds maximum message size of {MAX_MESSAGE}"
            )
        async with self._wlock:
            self.writer.write(HEADER.pack(len(payload), sid, mtype, 0) + payload)
            await self.writer.drain()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class Client:
    """A ttrpc client on one connection; ``call`` may be used concurrently."""

    def __init__(self, conn: _Conn) -> None:
        self._conn = conn
        self._next = 1
        self._pending: dict[int, asyncio.Future[ttrpc_pb2.Response]] = {}
        self._closed: BaseException | None = None
        self._on_close: list[Callable[[], None]] = []
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str, timeout_s: float = 5.0) -> Client:
        """Connect to a unix socket path (a ``unix://`` prefix is accepted)."""
        if path.startswith("unix://"):
            path = path[len("unix://") :]
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(path, limit=MAX_MESSAGE + 64), timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise Unavailable(f"cannot connect to {path}: {exc}") from exc
        return cls(_Conn(reader, writer))

    def on_close(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` once when the connection is lost (not after ``close()``)."""
        self._on_close.append(cb)

    @property
    def closed(self) -> bool:
        return self._closed is not None

    async def call(
        self,
        service: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        timeout_s: float | None = None,
        metadata: Metadata = (),
    ) -> M:
        if self._closed is not None:
            raise TTRPCError(f"ttrpc: closed: {self._closed}")
        sid = self._next
        self._next += 2
        req = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout_s * 1e9) if timeout_s else 0,
            metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in metadata],
        )
        fut: asyncio.Future[ttrpc_pb2.Response] = asyncio.get_running_loop().create_future()
        self._pending[sid] = fut
        try:
            await self._conn.send(sid, REQUEST, req.SerializeToString())
            try:
                resp = await asyncio.wait_for(fut, timeout_s) if timeout_s else await fut
            except TimeoutError:
                raise DeadlineExceeded(f"ttrpc {service}/{method}") from None
        finally:
            self._pending.pop(sid, None)
        if resp.HasField("status") and resp.status.code != 0:
            raise _error_from(resp.status)
        out = response_type()
        out.ParseFromString(resp.payload)
        return out

    async def _read_loop(self) -> None:
        err: BaseException = TTRPCError("connection closed")
        try:
            while True:
                sid, mtype, payload = await self._conn.read()
                if mtype != RESPONSE:
                    continue
                fut = self._pending.get(sid)
                if fut is None or fut.done():
                    continue
                resp = ttrpc_pb2.Response()
                if payload is not None:
                    resp.ParseFromString(payload)
                else:
                    resp.status.code = grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
                    resp.status.message = "response exceeds the maximum message size"
                fut.set_result(resp)
        except asyncio.CancelledError:
            err = TTRPCError("client closed")
            raise
        except (OSError, asyncio.IncompleteReadError, DecodeError) as exc:
            err = TTRPCError(f"connection lost: {exc}")
        finally:
            self._closed = err
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(TTRPCError(str(err)))
            self._conn.close()
            # close() clears the callbacks first: they only hear of a lost connection.
            for cb in self._on_close:
                try:
                    cb()
                except Exception:
                    log.exception("ttrpc close callback failed")

    async def close(self) -> None:
        self._on_close.clear()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._reader


@dataclass(frozen=True, slots=True)
class Method:
    """One served method: how to decode its argument and the coroutine that answers it."""

    request_type: type[Message]
    handler: Callable[[Any, Mapping[str, str]], Awaitable[Message]]


class Server:
    """A ttrpc server: ``register`` services, then ``serve`` on a unix socket path."""

    def __init__(self, *, require_same_user: bool = True) -> None:
        self._services: dict[str, dict[str, Method]] = {}
        self._server: asyncio.AbstractServer | None = None
        self._conns: set[_Conn] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._require_same_user = require_same_user

    def register(self, service: str, methods: Mapping[str, Method]) -> None:
        self._services.setdefault(service, {}).update(methods)

    async def serve(self, path: str, mode: int = 0o600) -> None:
        """Listen on ``path`` (a stale file is replaced) with permissions ``mode``."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        await self.serve_socket(sock)

    async def serve_socket(self, sock: socket.socket) -> None:
        """Serve on an already bound (and possibly listening) socket."""
        sock.listen(128)
        self._server = await asyncio.start_unix_server(
            self._handle, sock=sock, limit=MAX_MESSAGE + 64
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.close()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        if not self._require_same_user:
            return True
        sock = writer.get_extra_info("socket")
        if sock is None:
            return False
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, gid = struct.unpack("3i", creds)
        return bool(uid == os.geteuid() and gid == os.getegid())

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = _Conn(reader, writer)
        if not self._peer_allowed(writer):
            log.warning("ttrpc: refused a peer with other credentials")
            conn.close()
            return
        self._conns.add(conn)
        try:
            while True:
                sid, mtype, payload = await conn.read()
                if mtype != REQUEST:
                    continue
                task = asyncio.get_running_loop().create_task(self._dispatch(conn, sid, payload))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._conns.discard(conn)
            conn.close()

    async def _dispatch(self, conn: _Conn, sid: int, payload: bytes | None) -> None:
        resp = ttrpc_pb2.Response()
        try:
            if payload is None:
                raise ResourceExhausted(f"message exceeds maximum message size of {MAX_MESSAGE}")
            req = ttrpc_pb2.Request()
            req.ParseFromString(payload)
            method = self._services.get(req.service, {}).get(req.method)
            if method is None:
                if req.service not in self._services:
                    raise Unimplemented(f"service {req.service}")
                raise Unimplemented(f"method {req.service}/{req.method}")
            arg = method.request_type()
            try:
                arg.ParseFromString(req.payload)
            except DecodeError as exc:
                raise InvalidArgument(f"cannot decode {req.method} request: {exc}") from exc
            md = {kv.key: kv.value for kv in req.metadata}
            coro = method.handler(arg, md)
            if req.timeout_nano > 0:
                result = await asyncio.wait_for(coro, req.timeout_nano / 1e9)
            else:
                result = await coro
            resp.payload = result.SerializeToString()
        except asyncio.CancelledError:
            return
        except TimeoutError:
            resp.status.code = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]
            resp.status.message = "deadline exceeded"
        except Exception as exc:
            if not isinstance(exc, PycdError):
                log.exception("ttrpc handler failed")
            code, message = _code_of(exc)
            resp.status.code = code
            resp.status.message = message
        with contextlib.suppress(OSError, PycdError, ConnectionError):
            await conn.send(sid, RESPONSE, resp.SerializeToString())
