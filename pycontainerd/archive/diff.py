"""Compute a layer: write the changes between two directory trees as an OCI layer tar.

Two sources, as containerd has:

- ``overlay_upper=True``: ``upper`` is an overlay upperdir, which already holds exactly the
  changes. Every entry is written; a 0:0 character device becomes ``.wh.<name>`` and a
  directory with ``trusted.overlay.opaque=y`` gets a ``.wh..wh..opq`` marker.
- otherwise ``lower`` and ``upper`` are compared (continuity's double walk, ``fs.Changes``):
  added or changed entries are written, deleted ones become ``.wh.<name>``; ``lower=None``
  writes the whole of ``upper``. A file counts as unchanged with the same mode, owner,
  device, capability xattr, size and mtime (contents compared when mtimes lack
  nanoseconds), plus (our addition) the same non-``trusted`` xattrs.

The output is an uncompressed PAX tar in a deterministic order (byte order of names, parent
before children), with modes, numeric owners, xattrs other than ``trusted.*``, symlinks,
hardlinks (the second path to an inode becomes a link entry) and device nodes; mtimes are
truncated to seconds and whiteouts carry the epoch, as containerd's ``ChangeWriter`` does,
so the same tree always gives the same digest. Sockets are skipped. Wrap ``out`` with
:func:`compress` to store ``tar+gzip`` layers. Blocking: run it in a thread.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pycontainerd.archive.compression import compress
from pycontainerd.archive.errors import ArchiveCanceled, ArchiveError
from pycontainerd.archive.tar import OVERLAY_OPAQUE_XATTR, WHITEOUT_OPAQUE, WHITEOUT_PREFIX

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["compress", "write_diff"]

_CHUNK = 1 << 20
_BLOCK = 512
_CAPABILITY = "security.capability"


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


def _sort_key(name: str) -> bytes:
    return os.fsencode(name)


def _xattrs(path: str) -> dict[str, bytes]:
    try:
        keys = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return {}
        raise
    out: dict[str, bytes] = {}
    for key in sorted(keys):
        if key.startswith("trusted."):
            continue
        try:
            out[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
    return out


def _get_trusted(path: str, key: str) -> bytes | None:
    try:
        return os.getxattr(path, key, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return None
        raise


def _same_content(p1: str, p2: str) -> bool:
    with open(p1, "rb") as f1, open(p2, "rb") as f2:
        while True:
            b1, b2 = f1.read(_CHUNK), f2.read(_CHUNK)
            if b1 != b2:
                return False
            if not b1:
                return True


def _same_file(lpath: str, lst: os.stat_result, upath: str, ust: os.stat_result) -> bool:
    """continuity's sameFile, plus the non-trusted xattr set."""
    if (lst.st_dev, lst.st_ino) == (ust.st_dev, ust.st_ino):
        return True
    if (lst.st_mode, lst.st_uid, lst.st_gid, lst.st_rdev) != (
        ust.st_mode,
        ust.st_uid,
        ust.st_gid,
        ust.st_rdev,
    ):
        return False
    if _xattrs(lpath) != _xattrs(upath):
        return False
    if stat.S_ISDIR(ust.st_mode):
        return True
    if lst.st_size != ust.st_size:
        return False
    lsec, lns = divmod(lst.st_mtime_ns, 1_000_000_000)
    usec, uns = divmod(ust.st_mtime_ns, 1_000_000_000)
    if lsec != usec or lns != uns:
        return False
    if lns == 0:
        # Whole-second mtimes may come from a filesystem or tar that truncated them.
        if stat.S_ISLNK(ust.st_mode):
            return os.readlink(lpath) == os.readlink(upath)
        if stat.S_ISREG(ust.st_mode) and ust.st_size:
            return _same_content(lpath, upath)
    return True


@dataclass(slots=True)
class _Frame:
    rel: str  # "" for the root, else "a/b"
    names: Iterator[str]
    lower_dir: str | None  # the same directory in lower, when it is one
    written: bool = True  # root and already-emitted directories
    stat: os.stat_result | None = None


@dataclass(slots=True)
class _Writer:
    out: _Sink
    upper: str
    cancel: threading.Event | None
    stack: list[_Frame] = field(default_factory=list)
    inode_src: dict[tuple[int, int], str] = field(default_factory=dict)
    inode_refs: dict[tuple[int, int], list[str]] = field(default_factory=dict)

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise ArchiveCanceled("diff canceled")

    def _write_header(self, info: tarfile.TarInfo) -> None:
        self.out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))

    def ensure_parents(self) -> None:
        """Write pending parent directories first, as containerd's includeParents does."""
        for frame in self.stack:
            if not frame.written:
                frame.written = True
                assert frame.stat is not None
                self.entry(frame.rel, frame.stat, unmodified=False, parents=False)

    def whiteout(self, rel_dir: str, name: str) -> None:
        self.ensure_parents()
        info = tarfile.TarInfo(_join(rel_dir, WHITEOUT_PREFIX + name))
        info.mode = 0
        info.mtime = 0
        self._write_header(info)

    def opaque(self, rel_dir: str) -> None:
        info = tarfile.TarInfo(_join(rel_dir, WHITEOUT_OPAQUE))
        info.mode = 0
        info.mtime = 0
        self._write_header(info)

    def entry(
        self, rel: str, st: os.stat_result, *, unmodified: bool, parents: bool = True
    ) -> None:
        mode = st.st_mode
        if stat.S_ISSOCK(mode):
            return
        full = self.upper + "/" + rel
        info = tarfile.TarInfo(rel + "/" if stat.S_ISDIR(mode) else rel)
        info.mode = stat.S_IMODE(mode)
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        info.mtime = st.st_mtime_ns // 1_000_000_000
        extra_links: list[str] = []
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(mode):
            info.type = tarfile.SYMTYPE
            info.linkname = os.readlink(full)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        elif stat.S_ISFIFO(mode):
            info.type = tarfile.FIFOTYPE
        else:
            info.type = tarfile.REGTYPE
            info.size = st.st_size
        if not stat.S_ISDIR(mode) and st.st_nlink > 1:
            if key in self.inode_src:
                info.type, info.linkname, info.size = tarfile.LNKTYPE, self.inode_src[key], 0
            elif unmodified:
                # Emitted later as a link if another path to this inode changed.
                self.inode_refs.setdefault(key, []).append(rel)
                return
            else:
                self.inode_src[key] = rel
                extra_links = self.inode_refs.pop(key, [])
        elif unmodified:
            return
        info.pax_headers = {
            "SCHILY.xattr." + k: v.decode("utf-8", "surrogateescape")
            for k, v in _xattrs(full).items()
        }
        if parents:
            self.ensure_parents()
        self._write_header(info)
        if info.type == tarfile.REGTYPE and info.size:
            self._copy(full, info.size)
        for extra in extra_links:
            link = tarfile.TarInfo(extra)
            link.type, link.linkname = tarfile.LNKTYPE, rel
            link.mode, link.uid, link.gid, link.mtime = info.mode, info.uid, info.gid, info.mtime
            link.pax_headers = info.pax_headers
            self._write_header(link)

    def _copy(self, path: str, size: int) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            remaining = size
            while remaining > 0:
                self.check_cancel()
                chunk = os.read(fd, min(_CHUNK, remaining))
                if not chunk:
                    raise ArchiveError(f"{path!r} shrank while writing the diff")
                self.out.write(chunk)
                remaining -= len(chunk)
        finally:
            os.close(fd)
        if size % _BLOCK:
            self.out.write(bytes(_BLOCK - size % _BLOCK))


def _join(rel_dir: str, name: str) -> str:
    return f"{rel_dir}/{name}" if rel_dir else name


def _is_whiteout_device(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def write_diff(
    lower: Path | str | None,
    upper: Path | str,
    out: _Sink,
    *,
    overlay_upper: bool,
    cancel: threading.Event | None = None,
) -> None:
    """Write the layer turning ``lower`` into ``upper`` to ``out`` (uncompressed tar).

    With ``overlay_upper`` only ``upper`` (an overlay upperdir) is read and ``lower`` is
    ignored. Raises :class:`ArchiveError` on filesystem errors or an overlay
    ``redirect_dir`` (not supported), :class:`ArchiveCanceled` when ``cancel`` is set.
    """
    upper_s = os.path.abspath(upper)
    lower_s = None if lower is None or overlay_upper else os.path.abspath(lower)
    writer = _Writer(out=out, upper=upper_s, cancel=cancel)
    try:
        _walk(writer, lower_s, overlay_upper)
    except OSError as exc:
        raise ArchiveError(f"failed to write diff of {upper_s!r}: {exc}") from exc
    out.write(bytes(2 * _BLOCK))


def _walk(w: _Writer, lower: str | None, overlay_upper: bool) -> None:
    w.stack.append(_Frame("", iter(_merged(w.upper, lower)), lower))
    while w.stack:
        w.check_cancel()
        frame = w.stack[-1]
        name = next(frame.names, None)
        if name is None:
            w.stack.pop()
            continue
        rel = _join(frame.rel, name)
        upath = w.upper + "/" + rel
        try:
            ust: os.stat_result | None = os.lstat(upath)
        except FileNotFoundError:
            ust = None
        lpath = None if frame.lower_dir is None else frame.lower_dir + "/" + name
        try:
            lst = None if lpath is None else os.lstat(lpath)
        except FileNotFoundError:
            lst = None
        if ust is None:
            w.whiteout(frame.rel, name)
            continue
        if overlay_upper and _is_whiteout_device(ust):
            w.whiteout(frame.rel, name)
            continue
        unmodified = lst is not None and lpath is not None and _same_file(lpath, lst, upath, ust)
        if not stat.S_ISDIR(ust.st_mode):
            w.entry(rel, ust, unmodified=unmodified)
            continue
        opaque = False
        if overlay_upper:
            if _get_trusted(upath, "trusted.overlay.redirect") is not None:
                raise ArchiveError(f"{upath!r}: overlay redirect_dir is not supported")
            opaque = _get_trusted(upath, OVERLAY_OPAQUE_XATTR) == b"y"
        child_lower = lpath if lst is not None and stat.S_ISDIR(lst.st_mode) else None
        child = _Frame(rel, iter(_merged(upath, child_lower)), child_lower, stat=ust)
        if unmodified:
            child.written = False  # written only if something below it changed
        else:
            w.entry(rel, ust, unmodified=False)
        if opaque:
            w.opaque(rel)
        w.stack.append(child)


def _merged(upper_dir: str, lower_dir: str | None) -> list[str]:
    names = set(os.listdir(upper_dir))
    if lower_dir is not None:
        names.update(os.listdir(lower_dir))
    return sorted(names, key=_sort_key)
