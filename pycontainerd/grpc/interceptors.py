"""The server interceptor: request context in, domain errors out.

For every call it copies the ``containerd-namespace`` and ``containerd-lease`` metadata
values (the first value of each, as containerd does) into the context variables of
``pycontainerd.namespaces``, runs the handler, and turns a raised ``PycdError`` into the
status code its class names. Any other exception is logged and reported as UNKNOWN with
its text — one bad request never takes the daemon down. Wrapped handlers are cached per
method so the per-call cost is one dictionary lookup.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from pycontainerd.errdefs import PycdError
from pycontainerd.namespaces import LEASE_HEADER, NAMESPACE_HEADER, current_lease, current_namespace

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable

    Continuation = Callable[
        [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
    ]


def _set_context(context: grpc.aio.ServicerContext[Any, Any]) -> None:
    ns: str | None = None
    lease: str | None = None
    for key, value in context.invocation_metadata() or ():
        if key == NAMESPACE_HEADER and ns is None:
            ns = value if isinstance(value, str) else value.decode()
        elif key == LEASE_HEADER and lease is None:
            lease = value if isinstance(value, str) else value.decode()
    current_namespace.set(ns)
    current_lease.set(lease)


async def _fail(context: grpc.aio.ServicerContext[Any, Any], exc: Exception, method: str) -> None:
    if isinstance(exc, PycdError):
        log.debug("%s: %s", method, exc)
        await context.abort(exc.code, str(exc))
    log.error("%s: unexpected error", method, exc_info=exc)
    await context.abort(grpc.StatusCode.UNKNOWN, str(exc) or type(exc).__name__)


def _wrap_unary(behavior: Any, method: str) -> Any:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        _set_context(context)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, exc, method)

    return wrapped


def _wrap_stream(behavior: Any, method: str) -> Any:
    async def wrapped(
        request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        _set_context(context)
        try:
            async for item in behavior(request, context):
                yield item
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await _fail(context, exc, method)

    return wrapped


class ContextInterceptor(grpc.aio.ServerInterceptor):
    """Sets the request namespace/lease and maps domain errors to status codes."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], grpc.RpcMethodHandler[Any, Any]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        key = (method, id(handler))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        wrapped = wrap_handler(handler, method)
        self._cache[key] = wrapped
        return wrapped


def wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    h: Any = handler
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            _wrap_unary(h.unary_unary, method), h.request_deserializer, h.response_serializer
        )
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _wrap_stream(h.unary_stream, method), h.request_deserializer, h.response_serializer
        )
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            _wrap_unary(h.stream_unary, method), h.request_deserializer, h.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        _wrap_stream(h.stream_stream, method), h.request_deserializer, h.response_serializer
    )
