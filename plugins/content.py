"""Plugins for content: the on-disk store, its namespaced service, and the gRPC API.

- ``io.containerd.content.v1.content``: ``LocalStore`` at the plugin's root
  (``<root>/io.containerd.content.v1.content``, mode 0700) — blobs and ingests on disk,
  no namespaces.
- ``io.containerd.service.v1.content-service``: ``NamespacedContentStore`` over that store,
  the metadata database and the event exchange. Other plugins (images, diff, GC) get it
  with ``ic.get_by_id(PluginType.SERVICE, "content-service", NamespacedContentStore)``.
- ``io.containerd.grpc.v1.content``: the ``containerd.services.content.v1.Content`` servicer.
"""

from __future__ import annotations

import asyncio
import os

from pycontainerd.content.local import LocalStore
from pycontainerd.content.metadata import NamespacedContentStore
from pycontainerd.events import Publisher
from pycontainerd.grpc.content import ContentService
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.plugins.staging import optional_stager

__all__ = ["SERVICE_ID", "content", "content_service", "service"]

SERVICE_ID = "content-service"


def _open_local(ic: InitContext) -> LocalStore:
    ic.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Blobs and ingests are daemon-private: other users must not even list them.
    os.chmod(ic.root, 0o700)
    return LocalStore(ic.root)


async def _init_content(ic: InitContext) -> LocalStore:
    return await asyncio.to_thread(_open_local, ic)


async def _init_content_service(ic: InitContext) -> NamespacedContentStore:
    backend = ic.get(PluginType.CONTENT, LocalStore)
    db = ic.get(PluginType.METADATA, MetadataDB)
    publisher = ic.get(PluginType.EVENT, Publisher)  # type: ignore[type-abstract]
    return NamespacedContentStore(backend, db, publisher)


async def _init_grpc(ic: InitContext) -> ContentService:
    store = ic.get_by_id(PluginType.SERVICE, SERVICE_ID, NamespacedContentStore)
    return ContentService(store, optional_stager(ic))


content: Registration[LocalStore] = Registration(
    type=PluginType.CONTENT, id="content", init=_init_content
)

content_service: Registration[NamespacedContentStore] = Registration(
    type=PluginType.SERVICE,
    id=SERVICE_ID,
    init=_init_content_service,
    requires=(PluginType.CONTENT, PluginType.METADATA, PluginType.EVENT),
)

service: Registration[ContentService] = Registration(
    type=PluginType.GRPC,
    id="content",
    init=_init_grpc,
    requires=(PluginType.SERVICE,),
)
