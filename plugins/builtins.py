"""The built-in plugins, in registration order (the registry sorts them by dependency)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pycontainerd.plugins import (
    containers,
    content,
    core,
    cri,
    diff,
    events,
    gc,
    images,
    pull,
    snapshots,
    staging,
    tasks,
)

if TYPE_CHECKING:
    from pycontainerd.plugin import Registration

BUILTINS: tuple[Registration[Any], ...] = (
    events.exchange,
    staging.staging,
    content.content,
    snapshots.overlayfs,
    snapshots.native,
    core.metadata,
    tasks.events_receiver,
    tasks.runtime,
    content.content_service,
    snapshots.snapshots_service,
    core.namespaces_service,
    core.leases_service,
    images.service,
    containers.service,
    diff.differ,
    gc.scheduler,
    tasks.tasks_service,
    core.namespaces,
    core.leases,
    events.service,
    content.service,
    snapshots.service,
    diff.service,
    pull.pull,
    images.images,
    containers.containers,
    tasks.tasks,
    cri.cri,
    core.version,
    core.health,
    core.introspection,
)
