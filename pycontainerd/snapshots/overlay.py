"""The overlayfs snapshotter: each snapshot is an upper directory stacked on its parents.

A committed layer is never copied: a child's mounts list the parents' ``fs`` directories
as overlay lowerdirs (nearest parent first) with its own ``fs``/``work`` as upper/work.
Mount shapes, as ``ctr`` and the runtime expect (containerd's ``snapshots/overlay``):

- no parent: ``bind`` of the snapshot's ``fs``, ``rw,rbind`` (view: ``ro,rbind``);
- active with parents: ``overlay`` of source ``overlay`` with ``index=off`` (when the
  kernel knows the option), ``workdir=``, ``upperdir=``, ``lowerdir=p1:p2:…``;
- view of one parent: read-only bind of that parent's ``fs``;
- view of several: ``overlay`` with ``lowerdir`` only (read-only by construction).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from pycontainerd.snapshots.local import LocalSnapshotter
from pycontainerd.snapshots.mount import Mount, unmount_all
from pycontainerd.snapshots.snapshotter import Kind

if TYPE_CHECKING:
    from pycontainerd.snapshots import storage

__all__ = ["OverlaySnapshotter", "check_supported"]

_INDEX_PARAM = Path("/sys/module/overlay/parameters/index")


def check_supported(root: Path) -> None:
    """Mount a tiny two-layer overlay under ``root``; OSError says why overlayfs is unusable."""
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    td = Path(tempfile.mkdtemp(prefix="overlay-check-", dir=root))
    try:
        for d in ("lower1", "lower2", "upper", "work", "merged"):
            (td / d).mkdir()
        m = Mount(
            type="overlay",
            source="overlay",
            options=(
                f"lowerdir={td / 'lower2'}:{td / 'lower1'}",
                f"upperdir={td / 'upper'}",
                f"workdir={td / 'work'}",
            ),
        )
        m.mount(td / "merged")
        unmount_all(td / "merged")
    finally:
        shutil.rmtree(td, ignore_errors=True)


class OverlaySnapshotter(LocalSnapshotter):
    """Snapshots as overlayfs layers under ``root``."""

    @functools.cached_property
    def index_off(self) -> bool:
        """Whether the kernel knows overlay's ``index`` option (then mounts say ``off``)."""
        return _INDEX_PARAM.exists()

    def _populate(self, td: Path, kind: Kind, parent_fs: Path | None) -> None:
        fs = td / "fs"
        fs.mkdir()
        os.chmod(fs, 0o755)  # exact modes, whatever the daemon's umask
        if kind == Kind.ACTIVE:
            work = td / "work"
            work.mkdir()
            os.chmod(work, 0o711)

    def _adopt(self, td: Path, snap: storage.Snapshot) -> None:
        if snap.parent_ids:
            # The upper root's owner shows through as the merged root's owner.
            st = os.stat(self.fs_path(snap.parent_ids[0]))
            os.lchown(td / "fs", st.st_uid, st.st_gid)

    def _mounts(self, snap: storage.Snapshot) -> list[Mount]:
        if not snap.parent_ids:
            mode = "ro" if snap.kind == Kind.VIEW else "rw"
            return [Mount(type="bind", source=str(self.fs_path(snap.id)), options=(mode, "rbind"))]
        options: list[str] = []
        if self.index_off:
            options.append("index=off")
        if snap.kind == Kind.ACTIVE:
            options.append(f"workdir={self.work_path(snap.id)}")
            options.append(f"upperdir={self.fs_path(snap.id)}")
        elif len(snap.parent_ids) == 1:
            return [
                Mount(
                    type="bind",
                    source=str(self.fs_path(snap.parent_ids[0])),
                    options=("ro", "rbind"),
                )
            ]
        lower = ":".join(str(self.fs_path(p)) for p in snap.parent_ids)
        options.append(f"lowerdir={lower}")
        return [Mount(type="overlay", source="overlay", options=tuple(options))]
