"""Task bundles: ``<state>/<ns>/<id>`` with config.json, rootfs/ and a work dir link.

The layout is containerd's, so either daemon's shims find what they expect: the bundle
(0700) holds the OCI spec and the rootfs mount point (0711); ``work`` links to
``<root>/<ns>/<id>``, a persistent scratch directory for the shim. The shim writes
``address`` (its socket) into the bundle; the manager writes ``shim-binary-path``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from pycontainerd import identifiers
from pycontainerd.errdefs import AlreadyExists, InvalidArgument
from pycontainerd.snapshots.mount import unmount_all

CONFIG = "config.json"


@dataclass(frozen=True, slots=True)
class Bundle:
    id: str
    namespace: str
    path: Path
    work: Path

    @property
    def rootfs(self) -> Path:
        return self.path / "rootfs"

    def read(self, name: str) -> str:
        return (self.path / name).read_text().strip()

    def write(self, name: str, text: str) -> None:
        tmp = self.path / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.path / name)

    def delete(self) -> None:
        """Unmount the rootfs if a shim left it mounted, then remove the bundle and work dir."""
        with contextlib.suppress(OSError):
            unmount_all(self.rootfs)
        with contextlib.suppress(OSError):
            self.rootfs.rmdir()
        shutil.rmtree(self.path, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)


def _paths(root: Path, state: Path, ns: str, id_: str) -> tuple[Path, Path]:
    identifiers.validate(ns)
    try:
        identifiers.validate(id_)
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid task id {id_}: {exc.message}") from None
    return state / ns / id_, root / ns / id_


def create(root: Path, state: Path, ns: str, id_: str, spec: bytes) -> Bundle:
    """Lay out a new bundle (sync: run in a thread). AlreadyExists if one is there."""
    path, work = _paths(root, state, ns, id_)
    try:
        json.loads(spec)
    except ValueError as exc:
        raise InvalidArgument(f"container spec is not valid JSON: {exc}") from exc
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        raise AlreadyExists(f"task {id_}") from None
    b = Bundle(id_, ns, path, work)
    try:
        (path / "rootfs").mkdir(mode=0o711)
        work.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(mode=0o711)
        os.symlink(work, path / "work")
        (path / CONFIG).write_bytes(spec)
    except BaseException:
        b.delete()
        raise
    return b


def existing(root: Path, state: Path) -> list[Bundle]:
    """Every bundle on disk (names starting with ``.`` are skipped, as containerd does)."""
    out: list[Bundle] = []
    if not state.is_dir():
        return out
    for nsdir in sorted(state.iterdir()):
        if nsdir.name.startswith(".") or not nsdir.is_dir():
            continue
        for d in sorted(nsdir.iterdir()):
            if d.name.startswith(".") or not d.is_dir():
                continue
            out.append(Bundle(d.name, nsdir.name, d, root / nsdir.name / d.name))
    return out
