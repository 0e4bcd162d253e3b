"""Plugins for snapshots: the overlayfs and native snapshotters, the namespaced layer,
and the gRPC API.

- ``io.containerd.snapshotter.v1.overlayfs``: ``OverlaySnapshotter`` at the plugin root
  (mode 0700); skipped with a reason when overlayfs cannot be mounted here (no root, no
  kernel support, an upper filesystem overlay refuses).
- ``io.containerd.snapshotter.v1.native``: ``NativeSnapshotter`` at the plugin root.
- ``io.containerd.service.v1.snapshots-service``: ``SnapshotService``, every loaded
  snapshotter namespaced over the metadata database, publishing snapshot events. Other
  plugins get it with ``ic.get_by_id(PluginType.SERVICE, SERVICE_ID, SnapshotService)``
  and then ``service.get("overlayfs")``.
- ``io.containerd.grpc.v1.snapshots``: the ``containerd.services.snapshots.v1`` servicer.

Both keep their snapshot tables in the metadata database (``<id>_snapshots``), so that a
Prepare or Commit is one transaction (see ``snapshots.storage``). Both accept
``root_path`` (as containerd's overlayfs plugin does) to keep their data somewhere other
than the plugin root.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

from pycontainerd.events import Publisher
from pycontainerd.grpc.snapshots import SnapshotsServicer
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import InitContext, PluginType, Registration, SkipPlugin
from pycontainerd.snapshots.metadata import SnapshotService
from pycontainerd.snapshots.native import NativeSnapshotter
from pycontainerd.snapshots.overlay import OverlaySnapshotter, check_supported
from pycontainerd.snapshots.snapshotter import Snapshotter

__all__ = ["SERVICE_ID", "SnapshotterConfig", "native", "overlayfs", "service", "snapshots_service"]

SERVICE_ID = "snapshots-service"


@dataclass(frozen=True, slots=True)
class SnapshotterConfig:
    """``[plugins."io.containerd.snapshotter.v1.<id>"]``."""

    root_path: str = ""


def _root(ic: InitContext) -> Path:
    cfg = ic.config if isinstance(ic.config, SnapshotterConfig) else SnapshotterConfig()
    root = Path(cfg.root_path) if cfg.root_path else ic.root
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Snapshot trees hold other users' files with their modes: only root may traverse.
    os.chmod(root, 0o700)
    return root


def _table(ic: InitContext) -> str:
    """The snapshotter's table in the metadata database."""
    return f"{ic.registration.id}_snapshots"


def _open_overlay(ic: InitContext, db: MetadataDB) -> OverlaySnapshotter:
    root = _root(ic)
    try:
        check_supported(root)
    except OSError as exc:
        raise SkipPlugin(f"overlayfs is not supported on {root}: {exc}") from exc
    return OverlaySnapshotter(root, db=db, table=_table(ic))


async def _init_overlayfs(ic: InitContext) -> OverlaySnapshotter:
    return await asyncio.to_thread(_open_overlay, ic, ic.get(PluginType.METADATA, MetadataDB))


async def _init_native(ic: InitContext) -> NativeSnapshotter:
    db = ic.get(PluginType.METADATA, MetadataDB)
    return await asyncio.to_thread(lambda: NativeSnapshotter(_root(ic), db=db, table=_table(ic)))


async def _init_service(ic: InitContext) -> SnapshotService:
    snapshotters = ic.get_all(PluginType.SNAPSHOTTER, Snapshotter)  # type: ignore[type-abstract]
    db = ic.get(PluginType.METADATA, MetadataDB)
    publisher = ic.get(PluginType.EVENT, Publisher)  # type: ignore[type-abstract]
    return SnapshotService(db, snapshotters, publisher)


async def _init_grpc(ic: InitContext) -> SnapshotsServicer:
    return SnapshotsServicer(ic.get_by_id(PluginType.SERVICE, SERVICE_ID, SnapshotService))


overlayfs = Registration(
    type=PluginType.SNAPSHOTTER,
    id="overlayfs",
    init=_init_overlayfs,
    config=SnapshotterConfig,
    requires=(PluginType.METADATA,),
)
native = Registration(
    type=PluginType.SNAPSHOTTER,
    id="native",
    init=_init_native,
    config=SnapshotterConfig,
    requires=(PluginType.METADATA,),
)
snapshots_service = Registration(
    type=PluginType.SERVICE,
    id=SERVICE_ID,
    init=_init_service,
    requires=(PluginType.SNAPSHOTTER, PluginType.METADATA, PluginType.EVENT),
)
service = Registration(
    type=PluginType.GRPC, id="snapshots", init=_init_grpc, requires=(PluginType.SERVICE,)
)
