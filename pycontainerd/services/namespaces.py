"""The namespaces domain service: rules, transactions and events for namespaces."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pycontainerd import identifiers
from pycontainerd import labels as labelsmod
from pycontainerd.api.events import namespace_pb2
from pycontainerd.errdefs import InvalidArgument
from pycontainerd.events import Publisher, topics
from pycontainerd.metadata import namespaces as store
from pycontainerd.metadata.namespaces import Namespace
from pycontainerd.namespaces import current_namespace

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Sequence

    from pycontainerd.metadata.db import MetadataDB

__all__ = ["Namespace", "NamespaceService"]


class NamespaceService:
    """Create, read, relabel and delete namespaces; publishes ``/namespaces/*`` events."""

    def __init__(self, db: MetadataDB, publisher: Publisher) -> None:
        self._db = db
        self._publisher = publisher

    async def get(self, name: str) -> Namespace:
        # containerd answers Get of a never-created namespace with empty labels: ctr relies
        # on it to read the default snapshotter label before the first write.
        identifiers.validate(name)
        ns = await self._db.view(lambda c: store.get(c, name))
        return ns if ns is not None else Namespace(name)

    async def list_namespaces(self) -> list[Namespace]:
        return await self._db.view(store.list_all)

    async def create(self, name: str, labels: dict[str, str]) -> Namespace:
        identifiers.validate(name)
        ns = Namespace(name, labelsmod.validate(labels))
        await self._db.update(lambda c: store.create(c, ns))
        self._publish(
            topics.NAMESPACE_CREATE, namespace_pb2.NamespaceCreate(name=name, labels=ns.labels)
        )
        return ns

    async def update(self, name: str, labels: dict[str, str], paths: Sequence[str]) -> Namespace:
        identifiers.validate(name)
        incoming = labelsmod.validate(labels)

        for p in paths:
            if not p.startswith("labels."):
                raise InvalidArgument(f'cannot update "{p}" field')

        def _update(c: sqlite3.Connection) -> Namespace:
            cur = store.get(c, name)
            current = cur.labels if cur else {}
            # No mask: the request's labels replace the current ones.
            new = labelsmod.apply_paths(current, incoming, paths, "namespace") if paths else None
            store.set_labels(c, name, new if new is not None else dict(incoming))
            return Namespace(name, new if new is not None else dict(incoming))

        ns = await self._db.update(_update)
        self._publish(
            topics.NAMESPACE_UPDATE, namespace_pb2.NamespaceUpdate(name=name, labels=ns.labels)
        )
        return ns

    async def delete(self, name: str) -> None:
        identifiers.validate(name)
        await self._db.update(lambda c: store.delete(c, name))
        # The envelope of a delete carries the deleted namespace, as containerd's does.
        self._publisher.publish(
            topics.NAMESPACE_DELETE, namespace_pb2.NamespaceDelete(name=name), name
        )

    def _publish(
        self, topic: str, event: namespace_pb2.NamespaceCreate | namespace_pb2.NamespaceUpdate
    ) -> None:
        self._publisher.publish(topic, event, current_namespace.get() or event.name)
