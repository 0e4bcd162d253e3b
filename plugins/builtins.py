"""The built-in plugins, in registration order (the registry sorts them by dependency)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pycontainerd.plugins import content, core, diff, events, gc, images, snapshots

if TYPE_CHECKING:
    from pycontainerd.plugin import Registration

BUILTINS: tuple[Registration[Any], ...] = (
    events.exchange,
    content.content,
    snapshots.overlayfs,
    snapshots.native,
    core.metadata,
    content.content_service,
    snapshots.snapshots_service,
    core.namespaces_service,
    core.leases_service,
    images.service,
    diff.differ,
    gc.scheduler,
    core.namespaces,
    core.leases,
    events.service,
    content.service,
    snapshots.service,
    diff.service,
    images.images,
    core.version,
    core.health,
    core.introspection,
)
