"""The snapshotter contract: domain types and the ``Snapshotter`` protocol.

A snapshotter manages filesystem snapshots by *key*. ``prepare`` creates an **active**
(writable) snapshot on top of an optional committed parent and returns the mounts that
present it; ``view`` does the same read-only (a **view**); ``commit`` turns an active
snapshot into a **committed** one under a new name, which may then be the parent of
others. Keys are unique across all three kinds within one snapshotter.

Errors (``pycontainerd.errdefs``), as containerd's ``snapshots/storage`` raises them:

- ``prepare``/``view`` with an existing key: ``AlreadyExists``; missing parent:
  ``NotFound``; parent not committed: ``InvalidArgument``;
- ``commit`` to an existing name: ``AlreadyExists``; of a view or committed snapshot:
  ``FailedPrecondition``;
- ``mounts`` of a committed snapshot: ``FailedPrecondition``;
- ``remove`` of a snapshot with children: ``FailedPrecondition``;
- any operation on an unknown key: ``NotFound``;
- ``update`` of anything but ``labels``/``labels.<k>``: ``InvalidArgument``.

Timestamps are integer nanoseconds since the epoch (UTC), like the metadata schema.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from pycontainerd import filters
from pycontainerd.snapshots.mount import Mount

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "INHERITED_LABEL_PREFIX",
    "Info",
    "Kind",
    "Mount",
    "Snapshotter",
    "SyncSnapshotter",
    "Usage",
    "filter_infos",
    "inherited_labels",
]

# Labels with this prefix are passed down to the backend snapshotter by the namespaced
# layer (containerd's ``FilterInheritedLabels``); all others stay in the metadata store.
INHERITED_LABEL_PREFIX = "containerd.io/snapshot/"


class Kind(enum.IntEnum):
    """Snapshot kinds with the numbers of ``containerd.services.snapshots.v1.Kind``."""

    UNKNOWN = 0
    VIEW = 1
    ACTIVE = 2
    COMMITTED = 3

    @property
    def label(self) -> str:
        """The lower-case name filters compare against (``kind==committed``)."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Info:
    """What ``stat`` and ``walk`` report about one snapshot."""

    name: str
    kind: Kind
    parent: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True, slots=True)
class Usage:
    """Disk usage of a snapshot's own layer: bytes allocated and distinct inodes."""

    size: int = 0
    inodes: int = 0


def inherited_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """The labels the namespaced layer hands to the backend snapshotter."""
    return {k: v for k, v in labels.items() if k.startswith(INHERITED_LABEL_PREFIX)}


def _adaptor(info: Info) -> filters.Adaptor:
    return filters.field_adaptor(
        {
            "kind": info.kind.label,
            "name": info.name,
            "parent": info.parent,
            "labels": dict(info.labels),
        }
    )


def filter_infos(infos: Sequence[Info], filter_strings: Sequence[str]) -> list[Info]:
    """Keep the infos matching containerd filters over ``kind``, ``name``, ``parent``,
    ``labels.<k>``; InvalidArgument on a malformed filter."""
    flt = filters.parse(list(filter_strings))
    if flt is filters.ALWAYS:
        return list(infos)
    return [i for i in infos if flt.match(_adaptor(i))]


@runtime_checkable
class Snapshotter(Protocol):
    """A snapshotter as the rest of the daemon sees it (async; blocking work in threads)."""

    async def stat(self, key: str) -> Info:
        """Info of ``key``; NotFound if unknown."""

    async def update(self, info: Info, fieldpaths: Sequence[str] = ()) -> Info:
        """Change the labels of ``info.name`` (all of them when ``fieldpaths`` is empty)."""

    async def usage(self, key: str) -> Usage:
        """Disk usage of the snapshot's own layer (active: measured now; committed: at commit)."""

    async def mounts(self, key: str) -> list[Mount]:
        """The mounts of an active snapshot or view; FailedPrecondition for committed."""

    async def prepare(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create a writable snapshot of ``parent`` (or empty) and return its mounts."""

    async def view(
        self, key: str, parent: str = "", labels: Mapping[str, str] | None = None
    ) -> list[Mount]:
        """Create a read-only snapshot of ``parent`` and return its mounts."""

    async def commit(self, name: str, key: str, labels: Mapping[str, str] | None = None) -> None:
        """Turn the active snapshot ``key`` into the committed snapshot ``name``."""

    async def remove(self, key: str) -> None:
        """Remove a snapshot without children."""

    async def walk(self, filter_strings: Sequence[str] = ()) -> list[Info]:
        """All snapshots matching the filters (containerd syntax; empty matches all)."""

    async def cleanup(self) -> None:
        """Reclaim disk space held by removed or abandoned snapshots."""

    async def close(self) -> None:
        """Release the snapshotter's resources."""


@runtime_checkable
class SyncSnapshotter(Protocol):
    """A backend whose mutations can also be called synchronously from a worker thread.

    The namespaced layer uses these to do the backend work and its own metadata
    transaction in one thread hop. Same semantics and errors as the async methods.
    """

    # Whether create_sync is cheap (a few directories and a metastore row, never a copy
    # of the parent's data), so that it may run on the metadata database's thread.
    cheap_create: bool
    # Whether its writes made on the metadata database's thread join the transaction in
    # progress there: then a failure of that transaction undoes the backend's work too.
    shares_transactions: bool

    def create_sync(
        self, kind: Kind, key: str, parent: str, labels: Mapping[str, str]
    ) -> list[Mount]:
        """``prepare`` (kind ACTIVE) or ``view`` (kind VIEW)."""

    def mounts_sync(self, key: str) -> list[Mount]:
        """``mounts``."""

    def commit_sync(self, name: str, key: str, labels: Mapping[str, str]) -> None:
        """``commit``."""

    def commit_small_sync(self, name: str, key: str, labels: Mapping[str, str]) -> bool:
        """``commit`` when it is quick (a small snapshot: cheap to measure); False, with
        nothing done, when ``commit_sync`` must do it."""

    def remove_sync(self, key: str) -> None:
        """``remove``."""

    def remove_many_sync(self, keys: Sequence[str]) -> list[tuple[str, Exception]]:
        """Remove ``keys`` in order in one transaction; returns the ones that failed and
        why (the others are removed all the same)."""
