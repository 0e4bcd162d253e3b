"""containerd.services.images.v1.Images over the images domain service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2

from pycontainerd.api.services.images.v1 import images_pb2 as pb
from pycontainerd.api.services.images.v1 import images_pb2_grpc
from pycontainerd.api.types import descriptor_pb2
from pycontainerd.errdefs import InvalidArgument
from pycontainerd.grpc.convert import timestamp
from pycontainerd.services.images import Descriptor, Image

if TYPE_CHECKING:
    import grpc.aio

    from pycontainerd.services.images import ImageService

    Ctx = grpc.aio.ServicerContext[Any, Any]


def to_proto(img: Image) -> pb.Image:
    t = img.target
    return pb.Image(
        name=img.name,
        labels=img.labels,
        target=descriptor_pb2.Descriptor(
            media_type=t.media_type, digest=t.digest, size=t.size, annotations=t.annotations
        ),
        created_at=timestamp(img.created_at),
        updated_at=timestamp(img.updated_at),
    )


def from_proto(msg: pb.Image) -> Image:
    t = msg.target
    return Image(
        name=msg.name,
        target=Descriptor(t.media_type, t.digest, t.size, dict(t.annotations)),
        labels=dict(msg.labels),
    )


class ImagesServicer(images_pb2_grpc.ImagesServicer):
    def __init__(self, service: ImageService) -> None:
        self._svc = service

    def register(self, server: grpc.aio.Server) -> None:
        images_pb2_grpc.add_ImagesServicer_to_server(self, server)

    async def Get(self, request: pb.GetImageRequest, context: Ctx) -> pb.GetImageResponse:
        return pb.GetImageResponse(image=to_proto(await self._svc.get(request.name)))

    async def List(self, request: pb.ListImagesRequest, context: Ctx) -> pb.ListImagesResponse:
        found = await self._svc.list_images(list(request.filters))
        return pb.ListImagesResponse(images=[to_proto(i) for i in found])

    async def Create(self, request: pb.CreateImageRequest, context: Ctx) -> pb.CreateImageResponse:
        if not request.image.name:
            raise InvalidArgument("Image.Name required")
        created = await self._svc.create(from_proto(request.image))
        return pb.CreateImageResponse(image=to_proto(created))

    async def Update(self, request: pb.UpdateImageRequest, context: Ctx) -> pb.UpdateImageResponse:
        updated = await self._svc.update(from_proto(request.image), list(request.update_mask.paths))
        return pb.UpdateImageResponse(image=to_proto(updated))

    async def Delete(self, request: pb.DeleteImageRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.delete(request.name, request.sync)
        return empty_pb2.Empty()
