"""Registration of the garbage collector (``io.containerd.gc.v1.scheduler``).

It needs the content and snapshot services, and the image and lease services need it to
collect after deletions: to keep the plugin graph acyclic, the collector installs its
hook into those services when it starts, instead of them requiring it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging

from pycontainerd.content.metadata import NamespacedContentStore
from pycontainerd.errdefs import PycdError
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.services.containers import ContainerService
from pycontainerd.services.gc import GarbageCollector
from pycontainerd.services.images import ImageService
from pycontainerd.services.leases import LeaseService
from pycontainerd.snapshots.metadata import SnapshotService

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, slots=True)
class GCConfig:
    # Seconds between a deletion and the collection it schedules (requests coalesce).
    schedule_delay: float = 0.1
    # Run one collection this many seconds after start-up (negative: never).
    startup_delay: float = 0.1
    # Share of wall time collections may take: after one of d seconds, the next scheduled
    # one waits at least d / pause_threshold (0: no limit). Synchronous deletes never wait.
    pause_threshold: float = 0.02


async def _init(ic: InitContext) -> GarbageCollector:
    cfg: GCConfig = ic.config
    db = ic.get(PluginType.METADATA, MetadataDB)
    content = ic.get_by_id(PluginType.SERVICE, "content-service", NamespacedContentStore)
    try:
        snapshots: SnapshotService | None = ic.get_by_id(
            PluginType.SERVICE, "snapshots-service", SnapshotService
        )
    except PycdError as exc:
        log.warning("garbage collection will not cover snapshots: %s", exc)
        snapshots = None
    gc = GarbageCollector(
        db, content, snapshots, delay=cfg.schedule_delay, pause_threshold=cfg.pause_threshold
    )
    try:
        ic.get_by_id(PluginType.SERVICE, "images-service", ImageService).set_gc(gc.hook)
        ic.get_by_id(PluginType.SERVICE, "leases-service", LeaseService).set_gc(gc.hook)
        ic.get_by_id(PluginType.SERVICE, "containers-service", ContainerService).set_gc(gc.hook)
    except PycdError as exc:
        log.warning("deletions will not trigger garbage collection: %s", exc)
    if cfg.startup_delay >= 0:
        asyncio.get_running_loop().call_later(cfg.startup_delay, gc.schedule)
    return gc


scheduler = Registration(
    type=PluginType.GC,
    id="scheduler",
    init=_init,
    requires=(PluginType.METADATA, PluginType.SERVICE),
    config=GCConfig,
)
