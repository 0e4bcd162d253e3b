"""Event subscription as an async iterator.

``Events.Subscribe`` is a server stream of envelopes; the payload is an ``Any`` whose
type URL is the bare message name (``containerd.events.TaskExit``). ``Event.payload``
decodes it through ``pycontainerd.typeurl``; an unknown type is kept as the raw ``Any``.
Leaving the ``async for`` (break, exception, cancellation) cancels the stream.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from google.protobuf import any_pb2
from google.protobuf.message import Message

from pycontainerd import typeurl
from pycontainerd.api.services.events.v1 import events_pb2
from pycontainerd.client._client import timestamp_to_datetime
from pycontainerd.errdefs import PycdError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from pycontainerd.client._client import RawClient

__all__ = ["Event", "subscribe"]


@dataclass(frozen=True, slots=True)
class Event:
    timestamp: datetime
    namespace: str
    topic: str
    payload: Message | any_pb2.Any

    @property
    def type_name(self) -> str:
        if isinstance(self.payload, any_pb2.Any):
            return typeurl.type_name(self.payload.type_url)
        return self.payload.DESCRIPTOR.full_name


def _decode(envelope: events_pb2.Envelope) -> Event:
    payload: Message | any_pb2.Any
    try:
        payload = typeurl.unpack(envelope.event)
    except PycdError:
        payload = envelope.event
    return Event(
        timestamp_to_datetime(envelope.timestamp), envelope.namespace, envelope.topic, payload
    )


async def subscribe(client: RawClient, *filters: str) -> AsyncIterator[Event]:
    """Yield events matching any of ``filters`` (containerd filter syntax), in order."""
    req = events_pb2.SubscribeRequest(filters=filters)
    async for envelope in client.stream(client.events_stub.Subscribe, req):
        yield _decode(envelope)
