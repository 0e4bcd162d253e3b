"""What the network manager remembers on disk, and what host-local IPAM leaves behind.

Attachment records (``<state>/attachments/<id>.json``) are our write-ahead log: a record
is written *before* the first plugin runs, and updated with the ADD result after, so a
daemon that dies at any point finds, on restart, every attachment it may have made and
can run DEL for it (the CNI DEL is idempotent). The record keeps the exact config list
and capability arguments of the ADD, because DEL must see what ADD saw even if the
configuration changed since (libcni keeps a similar cache).

host-local stores each lease as a file named by the IP under ``<dataDir>/<network>/``,
holding ``<container id>\\r\\n<ifname>``; ``last_reserved_ip.*`` and ``lock`` are its
bookkeeping. A lease whose owner is neither live nor recorded is a leak that no DEL can
name any more (e.g. a crash between host-local writing it and our record being made):
:func:`release_orphan_leases` removes those files directly, under host-local's lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycontainerd.errdefs import DataLoss

if TYPE_CHECKING:
    from collections.abc import Collection

__all__ = [
    "AttachmentRecord",
    "Lease",
    "RecordStore",
    "list_leases",
    "release_orphan_leases",
]

log = logging.getLogger(__name__)


@dataclass(slots=True)
class AttachmentRecord:
    """One container's attachment to one network (its interfaces, IPs and port maps)."""

    id: str
    network: str
    netns: str
    ifname: str
    conflist: dict[str, Any] | None
    loopback: dict[str, Any] | None
    capability_args: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "network": self.network,
            "netns": self.netns,
            "ifname": self.ifname,
            "conflist": self.conflist,
            "loopback": self.loopback,
            "capabilityArgs": self.capability_args,
            "result": self.result,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> AttachmentRecord:
        return cls(
            id=str(doc["id"]),
            network=str(doc["network"]),
            netns=str(doc.get("netns", "")),
            ifname=str(doc.get("ifname", "eth0")),
            conflist=doc.get("conflist"),
            loopback=doc.get("loopback"),
            capability_args=dict(doc.get("capabilityArgs") or {}),
            result=doc.get("result"),
        )


class RecordStore:
    """Attachment records as one JSON file each; all methods are blocking."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _path(self, id: str) -> Path:
        return self.directory / f"{id}.json"

    def put(self, rec: AttachmentRecord) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(rec.id)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(rec.to_json(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    def get(self, id: str) -> AttachmentRecord | None:
        try:
            data = self._path(id).read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            return AttachmentRecord.from_json(json.loads(data))
        except (ValueError, KeyError, TypeError) as exc:
            raise DataLoss(f"network attachment record {id!r}: {exc}") from exc

    def delete(self, id: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._path(id).unlink()

    def list(self) -> list[AttachmentRecord]:
        """Every readable record; unreadable ones are logged and skipped."""
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        out: list[AttachmentRecord] = []
        for name in names:
            if not name.endswith(".json") or name.startswith("."):
                continue
            try:
                rec = self.get(name[: -len(".json")])
            except DataLoss as exc:
                log.warning("%s", exc)
                continue
            if rec is not None:
                out.append(rec)
        return out


@dataclass(frozen=True, slots=True)
class Lease:
    """One host-local IP lease file."""

    network: str
    ip: str
    container_id: str
    ifname: str
    path: Path


_BOOKKEEPING = ("lock",)


def list_leases(data_dir: Path, network: str) -> list[Lease]:
    """The leases host-local holds for ``network`` under ``data_dir`` (blocking)."""
    d = data_dir / network
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    out: list[Lease] = []
    for name in names:
        if name in _BOOKKEEPING or name.startswith(("last_reserved_ip", ".")):
            continue
        path = d / name
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except (FileNotFoundError, IsADirectoryError):
            continue
        owner, _, ifname = text.partition("\n")
        out.append(Lease(network, name, owner.strip(), ifname.strip(), path))
    return out


def release_orphan_leases(data_dir: Path, network: str, keep: Collection[str]) -> list[Lease]:
    """Delete the leases of ``network`` whose owner is not in ``keep``; the ones removed.

    Takes host-local's own lock file (an exclusive flock on ``<network>/lock``) so a
    concurrent plugin run never sees a half-released range.
    """
    d = data_dir / network
    if not d.is_dir():
        return []
    freed: list[Lease] = []
    with open(d / "lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            for lease in list_leases(data_dir, network):
                if lease.container_id in keep:
                    continue
                try:
                    lease.path.unlink()
                except FileNotFoundError:
                    continue
                freed.append(lease)
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return freed
