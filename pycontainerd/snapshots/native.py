"""The native snapshotter: every snapshot is a full copy of its parent's tree.

Works on any filesystem and needs no overlay support, at the cost of a copy per
snapshot (``cp -a --reflink=auto``, so copy-on-write filesystems share the blocks).
Mounts are always a bind of the snapshot's own ``fs``: ``rw,rbind`` for active
snapshots, ``ro,rbind`` for views.
"""

from __future__ import annotations

import os
import subprocess
from typing import TYPE_CHECKING

from pycontainerd.errdefs import Internal
from pycontainerd.snapshots.local import LocalSnapshotter
from pycontainerd.snapshots.mount import Mount
from pycontainerd.snapshots.snapshotter import Kind

if TYPE_CHECKING:
    from pathlib import Path

    from pycontainerd.snapshots import storage

__all__ = ["NativeSnapshotter", "copy_tree"]


def copy_tree(src: Path, dst: Path) -> None:
    """Copy ``src``'s contents into the existing ``dst``, preserving owners, modes,
    timestamps, links, xattrs and special files; the root's attributes come along too."""
    proc = subprocess.run(
        ["cp", "-a", "--reflink=auto", "--", f"{src}/.", f"{dst}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise Internal(f"copy {src} to {dst}: {proc.stderr.strip()}")


class NativeSnapshotter(LocalSnapshotter):
    """Snapshots as plain directory copies under ``root``."""

    copies_parent = True
    cheap_create = False  # a copy of the parent tree must not hold the metadata thread

    def _populate(self, td: Path, kind: Kind, parent_fs: Path | None) -> None:
        fs = td / "fs"
        fs.mkdir()
        os.chmod(fs, 0o755)
        if parent_fs is not None:
            copy_tree(parent_fs, fs)

    def _mounts(self, snap: storage.Snapshot) -> list[Mount]:
        mode = "ro" if snap.kind == Kind.VIEW else "rw"
        return [Mount(type="bind", source=str(self.fs_path(snap.id)), options=(mode, "rbind"))]
