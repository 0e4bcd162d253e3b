"""Registrations of the images service and its gRPC API."""

from __future__ import annotations

from pycontainerd.events import Publisher
from pycontainerd.grpc.images import ImagesServicer
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.services.images import ImageService


async def _service(ic: InitContext) -> ImageService:
    return ImageService(
        ic.get(PluginType.METADATA, MetadataDB),
        ic.get(PluginType.EVENT, Publisher),  # type: ignore[type-abstract]
    )


async def _grpc(ic: InitContext) -> ImagesServicer:
    return ImagesServicer(ic.get_by_id(PluginType.SERVICE, "images-service", ImageService))


service = Registration(
    type=PluginType.SERVICE,
    id="images-service",
    init=_service,
    requires=(PluginType.METADATA, PluginType.EVENT),
)
images = Registration(type=PluginType.GRPC, id="images", init=_grpc, requires=(PluginType.SERVICE,))
