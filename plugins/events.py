"""Plugins for events: the exchange (``io.containerd.event.v1.exchange``) and its gRPC API.

Config::

    [plugins."io.containerd.event.v1.exchange"]
    queue_size = 65536   # events a subscriber may fall behind before it is cut off
"""

from __future__ import annotations

from dataclasses import dataclass

from pycontainerd.events.exchange import DEFAULT_QUEUE_SIZE, Exchange
from pycontainerd.grpc.events import EventsService
from pycontainerd.plugin import InitContext, PluginType, Registration

__all__ = ["ExchangeConfig", "exchange", "service"]


@dataclass(frozen=True, slots=True)
class ExchangeConfig:
    queue_size: int = DEFAULT_QUEUE_SIZE


async def _init_exchange(ic: InitContext) -> Exchange:
    config = ic.config if isinstance(ic.config, ExchangeConfig) else ExchangeConfig()
    return Exchange(queue_size=config.queue_size)


async def _init_service(ic: InitContext) -> EventsService:
    return EventsService(ic.get(PluginType.EVENT, Exchange))


exchange: Registration[Exchange] = Registration(
    type=PluginType.EVENT, id="exchange", init=_init_exchange, config=ExchangeConfig
)

service: Registration[EventsService] = Registration(
    type=PluginType.GRPC, id="events", init=_init_service, requires=(PluginType.EVENT,)
)
