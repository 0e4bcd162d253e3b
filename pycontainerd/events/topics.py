"""Event topics, exactly as containerd publishes them, and the topic validity rule.

A topic is a ``/``-separated path: it starts with ``/``, has at least one component, and
every component is an identifier (``pycontainerd.identifiers``). The payload type for each
topic is noted beside it (``containerd.events.*`` unless stated otherwise). Note the
singular ``/snapshot/...`` prefix, which is containerd's.
"""

from __future__ import annotations

from pycontainerd import identifiers
from pycontainerd.errdefs import InvalidArgument

__all__ = [
    "ALL",
    "CONTAINER_CREATE",
    "CONTAINER_DELETE",
    "CONTAINER_UPDATE",
    "CONTENT_DELETE",
    "IMAGE_CREATE",
    "IMAGE_DELETE",
    "IMAGE_UPDATE",
    "NAMESPACE_CREATE",
    "NAMESPACE_DELETE",
    "NAMESPACE_UPDATE",
    "SNAPSHOT_COMMIT",
    "SNAPSHOT_PREPARE",
    "SNAPSHOT_REMOVE",
    "TASK_CHECKPOINTED",
    "TASK_CREATE",
    "TASK_DELETE",
    "TASK_EXEC_ADDED",
    "TASK_EXEC_STARTED",
    "TASK_EXIT",
    "TASK_IO",
    "TASK_OOM",
    "TASK_PAUSED",
    "TASK_RESUMED",
    "TASK_START",
    "validate",
]

NAMESPACE_CREATE = "/namespaces/create"  # NamespaceCreate
NAMESPACE_UPDATE = "/namespaces/update"  # NamespaceUpdate
NAMESPACE_DELETE = "/namespaces/delete"  # NamespaceDelete

IMAGE_CREATE = "/images/create"  # containerd.services.images.v1.ImageCreate
IMAGE_UPDATE = "/images/update"  # containerd.services.images.v1.ImageUpdate
IMAGE_DELETE = "/images/delete"  # containerd.services.images.v1.ImageDelete

CONTENT_DELETE = "/content/delete"  # ContentDelete

SNAPSHOT_PREPARE = "/snapshot/prepare"  # SnapshotPrepare
SNAPSHOT_COMMIT = "/snapshot/commit"  # SnapshotCommit
SNAPSHOT_REMOVE = "/snapshot/remove"  # SnapshotRemove

CONTAINER_CREATE = "/containers/create"  # ContainerCreate
CONTAINER_UPDATE = "/containers/update"  # ContainerUpdate
CONTAINER_DELETE = "/containers/delete"  # ContainerDelete

TASK_CREATE = "/tasks/create"  # TaskCreate
TASK_START = "/tasks/start"  # TaskStart
TASK_OOM = "/tasks/oom"  # TaskOOM
TASK_EXIT = "/tasks/exit"  # TaskExit
TASK_DELETE = "/tasks/delete"  # TaskDelete
TASK_EXEC_ADDED = "/tasks/exec-added"  # TaskExecAdded
TASK_EXEC_STARTED = "/tasks/exec-started"  # TaskExecStarted
TASK_PAUSED = "/tasks/paused"  # TaskPaused
TASK_RESUMED = "/tasks/resumed"  # TaskResumed
TASK_CHECKPOINTED = "/tasks/checkpointed"  # TaskCheckpointed
TASK_IO = "/tasks/io"  # TaskIO (defined by containerd, not published by its runtimes)

ALL: frozenset[str] = frozenset(
    {
        NAMESPACE_CREATE,
        NAMESPACE_UPDATE,
        NAMESPACE_DELETE,
        IMAGE_CREATE,
        IMAGE_UPDATE,
        IMAGE_DELETE,
        CONTENT_DELETE,
        SNAPSHOT_PREPARE,
        SNAPSHOT_COMMIT,
        SNAPSHOT_REMOVE,
        CONTAINER_CREATE,
        CONTAINER_UPDATE,
        CONTAINER_DELETE,
        TASK_CREATE,
        TASK_START,
        TASK_OOM,
        TASK_EXIT,
        TASK_DELETE,
        TASK_EXEC_ADDED,
        TASK_EXEC_STARTED,
        TASK_PAUSED,
        TASK_RESUMED,
        TASK_CHECKPOINTED,
        TASK_IO,
    }
)
"""Every topic containerd itself publishes."""


def validate(topic: str) -> str:
    """Return ``topic`` unchanged, or raise InvalidArgument saying what is wrong with it."""
    if not topic:
        raise InvalidArgument("topic must not be empty")
    if topic[0] != "/":
        raise InvalidArgument(f"topic {topic!r} must start with '/'")
    if len(topic) == 1:
        raise InvalidArgument(f"topic {topic!r} must have at least one component")
    for component in topic[1:].split("/"):
        try:
            identifiers.validate(component)
        except InvalidArgument as exc:
            raise InvalidArgument(
                f"topic {topic!r}: failed validation on component {component!r}: {exc.message}"
            ) from None
    return topic
