"""Registrations of the containers service and its gRPC API."""

from __future__ import annotations

from pycontainerd.events import Publisher
from pycontainerd.grpc.containers import ContainersServicer
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.services.containers import ContainerService


async def _service(ic: InitContext) -> ContainerService:
    return ContainerService(
        ic.get(PluginType.METADATA, MetadataDB),
        ic.get(PluginType.EVENT, Publisher),  # type: ignore[type-abstract]
    )


async def _grpc(ic: InitContext) -> ContainersServicer:
    return ContainersServicer(
        ic.get_by_id(PluginType.SERVICE, "containers-service", ContainerService)
    )


service = Registration(
    type=PluginType.SERVICE,
    id="containers-service",
    init=_service,
    requires=(PluginType.METADATA, PluginType.EVENT),
)
containers = Registration(
    type=PluginType.GRPC, id="containers", init=_grpc, requires=(PluginType.SERVICE,)
)
