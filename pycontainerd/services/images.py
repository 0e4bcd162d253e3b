"""The images domain service: image records, their events, and GC after deletion."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from pycontainerd import filters
from pycontainerd.api.events import image_pb2
from pycontainerd.events import topics
from pycontainerd.metadata import images as store
from pycontainerd.metadata.images import Descriptor, Image
from pycontainerd.namespaces import namespace_required

if TYPE_CHECKING:
    from pycontainerd.events import Publisher
    from pycontainerd.metadata.db import MetadataDB

__all__ = ["Descriptor", "Image", "ImageService"]

GCHook = Callable[[bool], Awaitable[None]]


def adaptor(img: Image) -> filters.Adaptor:
    return filters.field_adaptor(
        {
            "name": img.name,
            "target": {"digest": img.target.digest, "mediatype": img.target.media_type},
            "labels": img.labels,
            "annotations": img.target.annotations,
        }
    )


class ImageService:
    def __init__(self, db: MetadataDB, publisher: Publisher) -> None:
        self._db = db
        self._publisher = publisher
        self._gc: GCHook | None = None

    def set_gc(self, hook: GCHook) -> None:
        self._gc = hook

    async def get(self, name: str) -> Image:
        ns = namespace_required()
        return await self._db.view(lambda c: store.get(c, ns, name))

    async def list_images(self, filter_strings: Sequence[str]) -> list[Image]:
        ns = namespace_required()
        flt = filters.parse(list(filter_strings))
        found = await self._db.view(lambda c: store.list_all(c, ns))
        return [i for i in found if flt.match(adaptor(i))]

    async def create(self, image: Image) -> Image:
        ns = namespace_required()
        created = await self._db.update(lambda c: store.create(c, ns, image))
        self._publisher.publish(
            topics.IMAGE_CREATE, image_pb2.ImageCreate(name=created.name, labels=created.labels)
        )
        return created

    async def update(self, image: Image, paths: Sequence[str]) -> Image:
        ns = namespace_required()
        updated = await self._db.update(lambda c: store.update(c, ns, image, paths))
        self._publisher.publish(
            topics.IMAGE_UPDATE, image_pb2.ImageUpdate(name=updated.name, labels=updated.labels)
        )
        return updated

    async def delete(self, name: str, sync: bool = False) -> None:
        ns = namespace_required()
        await self._db.update(lambda c: store.delete(c, ns, name))
        self._publisher.publish(topics.IMAGE_DELETE, image_pb2.ImageDelete(name=name))
        if self._gc is not None:
            await self._gc(sync)
