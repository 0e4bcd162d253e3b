"""An in-process channel: clients inside the daemon call its services without a socket.

The CRI plugin drives the daemon through the same client SDK as any user
(``pycontainerd.client``), as containerd's CRI plugin uses containerd's Go client. Over
the unix socket every call cost a grpc.aio round trip — serialising, HTTP/2 framing on
both sides, two event-loop wake-ups — for a callee living in the same event loop.
containerd hands its CRI plugin in-process service clients for the same reason.

:class:`LocalChannel` has the parts of ``grpc.aio.Channel`` the generated stubs and the
SDK use (``unary_unary``, ``unary_stream``, ``stream_stream``, ``stream_unary``,
``channel_ready``, ``close``). Each call looks the method up in the daemon's
:class:`~pycontainerd.grpc.transport.Server` — so it passes through the same
interceptor, which maps domain errors and reads the namespace and lease headers — and
runs the behaviour in a task of its own, so the interceptor's context variables never
leak into the caller's context. Messages are copied through their wire form in both
directions (protobuf's C serialisation costs microseconds): caller and service never
share a mutable message, exactly as over a socket. Failures surface as
``grpc.aio.AioRpcError`` with the status the socket would have carried, which the SDK
turns back into domain errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from pycontainerd.grpc.transport import STREAMING_KINDS, Server, StatusContext, Wire

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Generator, Iterable

    Serializer = Callable[[Any], bytes] | None
    Deserializer = Callable[[bytes], Any] | None
    Metadata = Iterable[tuple[str, str | bytes]]

__all__ = ["LocalChannel"]

log = logging.getLogger(__name__)

# Responses a server stream may run ahead of its reader (the socket's flow control).
_STREAM_WINDOW = 16
_EMPTY_MD = grpc.aio.Metadata()


def _error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, _EMPTY_MD, _EMPTY_MD, details)


def _copy(msg: Any, ser: Serializer, des: Deserializer) -> Any:
    wire = msg if ser is None or type(msg) is Wire else ser(msg)
    return des(wire) if des is not None else wire


class _Context(StatusContext):
    """The servicer context of an in-process call (what ``ServicerContext`` offers)."""

    __slots__ = ("_deadline", "_done", "_metadata", "_out")

    def __init__(
        self,
        metadata: tuple[tuple[str, str | bytes], ...],
        deadline: float | None,
        out: asyncio.Queue[Any] | None = None,
    ) -> None:
        super().__init__()
        self._metadata = metadata
        self._deadline = deadline
        self._done = False
        self._out = out

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._metadata

    def peer(self) -> str:
        return "local"

    def time_remaining(self) -> float | None:
        d = self._deadline
        return None if d is None else max(0.0, d - time.monotonic())

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return self._done

    async def send_initial_metadata(self, metadata: Metadata) -> None:
        return None

    async def write(self, message: Any) -> None:
        if self._out is None:
            raise RuntimeError("write on a call without a response stream")
        await self._out.put(message)

    def finish(self) -> None:
        self._done = True
        self._run_callbacks()

    def status(self, exc: BaseException | None) -> grpc.aio.AioRpcError | None:
        """The error a client sees for how the behaviour ended (None: OK)."""
        if exc is None or isinstance(exc, grpc.aio.AbortError):
            code = self._code or (grpc.StatusCode.UNKNOWN if exc is not None else None)
            if code is None or code == grpc.StatusCode.OK:
                return None
            return _error(code, self._details)
        if isinstance(exc, asyncio.CancelledError):
            return _error(grpc.StatusCode.CANCELLED, "Cancelled")
        return _error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc).__name__}: {exc}")


# Ends a response stream; the call's status is in ``_Call._result``.
_END = object()


class _Call:
    """One in-process call: the behaviour runs in its own task.

    Unary responses are awaited; streamed ones are read (``read``/``async for``);
    streamed requests are written (``write``/``done_writing``). ``cancel`` stops the
    behaviour, as a client's RST_STREAM would.
    """

    def __init__(
        self,
        channel: LocalChannel,
        method: str,
        ser: Serializer,
        des: Deserializer,
        request: Any,
        streaming_request: bool,
        metadata: Metadata | None,
        timeout: float | None,
    ) -> None:
        self._method = method
        self._des = des
        deadline = None if timeout is None else time.monotonic() + timeout
        self._out: asyncio.Queue[Any] = asyncio.Queue(_STREAM_WINDOW)
        self._in: asyncio.Queue[Any] | None = asyncio.Queue() if streaming_request else None
        self._ctx = _Context(tuple(metadata or ()), deadline, self._out)
        self._ended = False
        rpc = channel.server.lookup(method)
        if rpc is None:
            self._task: asyncio.Task[Any] | None = None
            self._result: Any = _error(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {method}")
            return
        kind, behavior, req_des, resp_ser = rpc
        self._resp_ser: Serializer = resp_ser
        if streaming_request:
            arg: Any = self._requests(ser, req_des)
        else:
            arg = _copy(request, ser, req_des)
        self._result = None
        self._task = asyncio.get_running_loop().create_task(
            self._run(behavior, arg, kind in STREAMING_KINDS, timeout), name=method
        )

    async def _requests(self, ser: Serializer, des: Deserializer) -> AsyncIterator[Any]:
        assert self._in is not None
        while True:
            msg = await self._in.get()
            if msg is _DONE_WRITING:
                return
            yield _copy(msg, ser, des)

    async def _run(self, behavior: Any, arg: Any, streams: bool, limit: float | None) -> Any:
        """Run the behaviour; never raises but CancelledError (the status is kept)."""
        ctx = self._ctx
        response = None
        try:
            async with asyncio.timeout(limit):
                if not streams:
                    response = await behavior(arg, ctx)
                else:
                    gen = behavior(arg, ctx)
                    if hasattr(gen, "__aiter__"):
                        async for item in gen:
                            await self._out.put(item)
                    elif gen is not None:
                        await gen  # a behaviour that wrote through context.write
            error = ctx.status(None)
        except TimeoutError:
            error = _error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")
        except asyncio.CancelledError:
            self._result = _error(grpc.StatusCode.CANCELLED, "Cancelled")
            ctx.finish()
            with contextlib.suppress(asyncio.QueueFull):
                self._out.put_nowait(_END)
            raise
        except Exception as exc:
            if not isinstance(exc, grpc.aio.AbortError):
                log.exception("unhandled error in %s", self._method)
            error = ctx.status(exc)
        self._result = error
        ctx.finish()
        if streams:
            await self._out.put(_END)  # waits for the reader, like flow control
        return response

    # -- unary response --------------------------------------------------------------

    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        if self._task is None:
            raise self._result
        response = await self._task
        if self._result is not None:
            raise self._result
        if response is None:
            raise _error(grpc.StatusCode.INTERNAL, "no response message")
        return _copy(response, self._resp_ser, self._des)

    # -- response stream -------------------------------------------------------------

    async def read(self) -> Any:
        if self._task is None:
            raise self._result
        if self._out.empty() and self._task.done():
            self._ended = True  # cancelled with a full window: no end marker came
        if not self._ended:
            item = await self._out.get()
            if item is not _END:
                return _copy(item, self._resp_ser, self._des)
            self._ended = True
        if self._result is not None:
            raise self._result
        return grpc.aio.EOF

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        while True:
            msg = await self.read()
            if msg is grpc.aio.EOF:
                return
            yield msg

    # -- request stream --------------------------------------------------------------

    async def write(self, request: Any) -> None:
        if self._in is None:
            raise RuntimeError("write on a call without a request stream")
        if self._task is not None and self._task.done():
            raise self._result or _error(grpc.StatusCode.INTERNAL, "call already ended")
        self._in.put_nowait(request)

    async def done_writing(self) -> None:
        if self._in is not None:
            self._in.put_nowait(_DONE_WRITING)

    # -- control ---------------------------------------------------------------------

    def cancel(self) -> bool:
        if self._task is None or self._task.done():
            return False
        self._task.cancel()
        return True

    def done(self) -> bool:
        return self._task is None or self._task.done()


_DONE_WRITING = object()


class _MultiCallable:
    __slots__ = ("_channel", "_des", "_method", "_ser", "_streaming_request")

    def __init__(
        self,
        channel: LocalChannel,
        method: str,
        ser: Serializer,
        des: Deserializer,
        streaming_request: bool,
    ) -> None:
        self._channel = channel
        self._method = method
        self._ser = ser
        self._des = des
        self._streaming_request = streaming_request

    def __call__(
        self,
        request: Any = None,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **_: Any,
    ) -> _Call:
        return _Call(
            self._channel,
            self._method,
            self._ser,
            self._des,
            request,
            self._streaming_request,
            metadata,
            timeout,
        )


class LocalChannel:
    """A ``grpc.aio.Channel`` stand-in whose calls run in this process's server."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def unary_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        **_: Any,
    ) -> Any:
        return _MultiCallable(self, method, request_serializer, response_deserializer, False)

    def stream_unary(
        self,
        method: str,
        request_serializer: Serializer = None,
        response_deserializer: Deserializer = None,
        **_: Any,
    ) -> Any:
        return _MultiCallable(self, method, request_serializer, response_deserializer, True)

    # A call reads its answer as a stream or awaits it, whatever the method's kind: only
    # whether the request is a stream tells the callables apart.
    unary_stream = unary_unary
    stream_stream = stream_unary

    async def channel_ready(self) -> None:
        return None

    async def close(self, grace: float | None = None) -> None:
        return None

    async def __aenter__(self) -> LocalChannel:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None
