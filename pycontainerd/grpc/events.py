"""The ``containerd.services.events.v1.Events`` servicer over the exchange.

Publish takes the request's namespace (FailedPrecondition without one) and an already
packed ``Any``; Forward takes a whole envelope. Subscribe streams envelopes until the
client cancels, sending the bytes the exchange serialized at publish time: the method is
registered with an identity response serializer instead of the generated one, so an event
is encoded once however many subscribers it reaches. As in containerd, a malformed filter
on Subscribe is reported as UNKNOWN (a plain ``PycdError``), not INVALID_ARGUMENT.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio
from google.protobuf import empty_pb2

from pycontainerd.api.services.events.v1 import events_pb2
from pycontainerd.errdefs import InvalidArgument, PycdError
from pycontainerd.namespaces import namespace_required

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from pycontainerd.events.exchange import Exchange

__all__ = ["SERVICE_NAME", "EventsService"]

log = logging.getLogger(__name__)

SERVICE_NAME = "containerd.services.events.v1.Events"

Context = Any  # grpc.aio.ServicerContext[request, response]; the stubs' generics add nothing


def _identity(data: bytes) -> bytes:
    return data


class EventsService:
    """gRPC plugin instance: ``register(server)`` adds the Events service."""

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange

    async def Publish(
        self, request: events_pb2.PublishRequest, context: Context
    ) -> empty_pb2.Empty:
        namespace = namespace_required()
        self.exchange.publish(request.topic, request.event, namespace)
        return empty_pb2.Empty()

    async def Forward(
        self, request: events_pb2.ForwardRequest, context: Context
    ) -> empty_pb2.Empty:
        self.exchange.forward(request.envelope)
        return empty_pb2.Empty()

    async def Subscribe(
        self, request: events_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[bytes]:
        try:
            sub = self.exchange.subscribe(list(request.filters))
        except InvalidArgument as exc:
            # containerd wraps this error without a class, so clients see UNKNOWN.
            raise PycdError(f"failed parsing subscription filters: {exc}") from exc
        try:
            async for data in sub.raw():
                yield data
        finally:
            # Runs when the client cancels too: the subscriber stops costing anything.
            sub.close()

    def handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        return {
            "Publish": grpc.unary_unary_rpc_method_handler(
                self.Publish,
                request_deserializer=events_pb2.PublishRequest.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            ),
            "Forward": grpc.unary_unary_rpc_method_handler(
                self.Forward,
                request_deserializer=events_pb2.ForwardRequest.FromString,
                response_serializer=empty_pb2.Empty.SerializeToString,
            ),
            "Subscribe": grpc.unary_stream_rpc_method_handler(
                self.Subscribe,
                request_deserializer=events_pb2.SubscribeRequest.FromString,
                response_serializer=_identity,
            ),
        }

    def register(self, server: grpc.aio.Server) -> None:
        handlers = self.handlers()
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),)
        )
        # Registered methods skip grpc's per-call generic lookup (as generated code does).
        add_registered = getattr(server, "add_registered_method_handlers", None)
        if add_registered is not None:
            add_registered(SERVICE_NAME, handlers)
