"""The containers domain service: container records, their events, and GC after deletion.

Each operation is one metadata transaction in the request's namespace; its event
(``/containers/create``, ``/containers/update``, ``/containers/delete``) is published only
after the transaction committed. A deletion then asks the garbage collector for a
collection (not a synchronous one: containerd only marks the database dirty), because
the container may have been the last thing holding its snapshot.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from google.protobuf import any_pb2

from pycontainerd import filters
from pycontainerd.api.events import container_pb2
from pycontainerd.events import topics
from pycontainerd.metadata import containers as store
from pycontainerd.metadata.containers import AnyValue, Container, Runtime
from pycontainerd.namespaces import namespace_required

if TYPE_CHECKING:
    from pycontainerd.events import Publisher
    from pycontainerd.metadata.db import MetadataDB

__all__ = ["AnyValue", "Container", "ContainerService", "Runtime", "adaptor"]

GCHook = Callable[[bool], Awaitable[None]]


def adaptor(c: Container) -> filters.Adaptor:
    """Filter fields of a container, as containerd's ``adaptContainer``."""
    return filters.field_adaptor(
        {"id": c.id, "runtime": {"name": c.runtime.name}, "image": c.image, "labels": c.labels}
    )


class ContainerService:
    """Container records of the request's namespace.

    Raises InvalidArgument (bad id, missing runtime name or spec, snapshot key without
    snapshotter, bad labels or filters, immutable field or unknown path in an update),
    NotFound and AlreadyExists, and FailedPrecondition when the request has no namespace.
    """

    def __init__(self, db: MetadataDB, publisher: Publisher) -> None:
        self._db = db
        self._publisher = publisher
        self._gc: GCHook | None = None

    def set_gc(self, hook: GCHook) -> None:
        """Install the collector's hook (the GC plugin does, to keep the graph acyclic)."""
        self._gc = hook

    async def get(self, cid: str) -> Container:
        ns = namespace_required()
        return await self._db.view(lambda c: store.get(c, ns, cid))

    async def list_containers(self, filter_strings: Sequence[str]) -> list[Container]:
        ns = namespace_required()
        flt = filters.parse(list(filter_strings))
        found = await self._db.view(lambda c: store.list_all(c, ns))
        return [c for c in found if flt.match(adaptor(c))]

    async def create(self, container: Container) -> Container:
        ns = namespace_required()
        created = await self._db.update(lambda c: store.create(c, ns, container))
        opts = created.runtime.options
        self._publisher.publish(
            topics.CONTAINER_CREATE,
            container_pb2.ContainerCreate(
                id=created.id,
                image=created.image,
                runtime=container_pb2.ContainerCreate.Runtime(
                    name=created.runtime.name,
                    options=None
                    if opts is None
                    else any_pb2.Any(type_url=opts.type_url, value=opts.value),
                ),
            ),
        )
        return created

    async def update(self, container: Container, paths: Sequence[str]) -> Container:
        ns = namespace_required()
        updated = await self._db.update(lambda c: store.update(c, ns, container, paths))
        self._publisher.publish(
            topics.CONTAINER_UPDATE,
            container_pb2.ContainerUpdate(
                id=updated.id,
                image=updated.image,
                labels=updated.labels,
                snapshot_key=updated.snapshot_key,
            ),
        )
        return updated

    async def delete(self, cid: str) -> None:
        ns = namespace_required()
        await self._db.update(lambda c: store.delete(c, ns, cid))
        self._publisher.publish(topics.CONTAINER_DELETE, container_pb2.ContainerDelete(id=cid))
        if self._gc is not None:
            await self._gc(False)
