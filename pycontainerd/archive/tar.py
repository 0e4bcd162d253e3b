"""Apply an OCI layer (an uncompressed tar stream) to a directory, the containerd way.

:func:`apply_layer` follows containerd's ``archive.Apply`` (``archive/tar.go``) entry by
entry: the name is cleaned and clamped at the root, its parent is resolved inside the root
afresh for every entry (symlinks followed as if chrooted, see :mod:`.rootpath`), the base
name is never followed, entries resolving to the root are skipped, missing parents are
created (copying a lower layer's directory attributes when ``lower_dirs`` are given), and
an existing path is replaced unless directory meets directory. Files are created with
``O_EXCL|O_NOFOLLOW`` and their owner, xattrs, mode (after chown, so setuid survives) and
times set through the fd; other entries use no-follow calls, and a symlink's mode is never
touched. ``trusted.*`` xattrs from the archive are refused (they would forge overlay
metadata). Whiteouts become overlay char devices / ``trusted.overlay.opaque`` in overlay
mode, or deletions in naive mode.

Every uncompressed byte read, including anything after the end-of-archive blocks, is
hashed: the digest is the layer's diff ID. Failures raise :class:`ArchiveError`; the
caller owns cleaning up the half-applied directory. Blocking: run it in a thread.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import stat
import tarfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from pycontainerd.archive._fsops import (
    bound_time_ns,
    copy_dir_info,
    lchmod,
    remove_all,
    set_xattr,
)
from pycontainerd.archive._tarstream import Header, TarReader
from pycontainerd.archive.errors import ArchiveCanceled, ArchiveError, InvalidArchive
from pycontainerd.archive.rootpath import clean_components, hardlink_root_path, root_path

if TYPE_CHECKING:
    import threading
    from collections.abc import Collection, Sequence
    from pathlib import Path

__all__ = [
    "WHITEOUT_OPAQUE",
    "WHITEOUT_PREFIX",
    "ApplyResult",
    "apply_layer",
    "copy_implied_parents",
    "drop_overlay_markers",
]

log = logging.getLogger(__name__)

WHITEOUT_PREFIX = ".wh."
WHITEOUT_OPAQUE = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"

_CHUNK = 1 << 20
_MAX_ID = 0xFFFFFFFE  # (uid_t)-1 means "leave unchanged" to chown: never accept it
_MAX_DEV = 0xFFFFFFFF
_REGULAR = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
_DEVICES = {tarfile.CHRTYPE: stat.S_IFCHR, tarfile.BLKTYPE: stat.S_IFBLK}
_SUPPORTED = _REGULAR | {
    tarfile.DIRTYPE,
    tarfile.SYMTYPE,
    tarfile.LNKTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.FIFOTYPE,
}


class _Source(Protocol):
    def read(self, n: int, /) -> bytes: ...


@dataclass(frozen=True, slots=True)
class ApplyResult:
    """The diff ID (sha256 of the uncompressed stream) and its length in bytes.

    When the apply deferred the attributes of implied parent directories
    (``defer_parents``), ``implied`` lists the directories it created for entries below
    them (paths relative to the root, in order of creation) and ``relisted`` those of
    them a later entry of the layer gave attributes of its own:
    :func:`copy_implied_parents` finishes them.
    """

    digest: str
    size: int
    implied: tuple[str, ...] = ()
    relisted: frozenset[str] = frozenset()
    # Overlay-form applies with deferred parents also list the whiteout devices and the
    # opaque directories they made, for :func:`drop_overlay_markers`.
    whiteouts: frozenset[str] = frozenset()
    opaques: frozenset[str] = frozenset()
    # False when an opaque marker came after entries it would have deleted in a naive
    # apply (implied directories): then only a real naive apply gives the first layer.
    markers_droppable: bool = True


class _HashingReader:
    def __init__(self, src: _Source) -> None:
        self._src = src
        self._hash = hashlib.sha256()
        self.size = 0

    def read(self, n: int, /) -> bytes:
        data = self._src.read(n)
        if data:
            self._hash.update(data)
            self.size += len(data)
        return data

    def digest(self) -> str:
        return "sha256:" + self._hash.hexdigest()


@functools.cache
def _in_user_namespace() -> bool:
    try:
        with open("/proc/self/uid_map", encoding="ascii") as f:
            fields = f.read().split()
    except OSError:
        return False
    return fields != ["0", "0", "4294967295"]


def apply_layer(
    root: Path | str,
    stream: _Source,
    *,
    overlay: bool,
    lower_dirs: Sequence[Path | str] = (),
    cancel: threading.Event | None = None,
    defer_parents: bool = False,
) -> ApplyResult:
    """Unpack the uncompressed layer ``stream`` into ``root``; return its diff ID and size.

    ``overlay=True``: ``root`` is an overlay upperdir; whiteouts are written as overlay
    expects and ``lower_dirs`` (topmost first) supply attributes for implied parent
    directories. ``overlay=False``: whiteouts delete from ``root`` (a merged view or a
    native snapshot). ``cancel`` is polled between entries and data chunks.
    ``defer_parents``: the lower layers are not known yet (the layer is staged before its
    parent is unpacked); implied parents are listed in the result instead.

    Raises :class:`InvalidArchive` for malformed or refused input, :class:`ArchiveCanceled`
    when cancelled, :class:`ArchiveError` for filesystem failures.
    """
    src = _HashingReader(stream)
    applier = _Applier(
        os.path.abspath(root), overlay, [os.path.abspath(p) for p in lower_dirs], cancel
    )
    if defer_parents:
        applier.implied = {}
        applier.relisted = set()
        if overlay:
            applier.whiteouts, applier.opaques = set(), set()
    reader = TarReader(src)
    while True:
        applier.check_cancel()
        hdr = reader.next()
        if hdr is None:
            break
        try:
            applier.entry(hdr, reader)
        except OSError as exc:
            raise ArchiveError(f"failed to apply {hdr.name!r}: {exc}") from exc
        except (ValueError, OverflowError) as exc:
            # e.g. a NUL byte smuggled into a PAX path or xattr name
            raise InvalidArchive(f"failed to apply {hdr.name!r}: {exc}") from exc
    try:
        applier.finish_dirs()
    except OSError as exc:
        raise ArchiveError(f"failed to set directory times: {exc}") from exc
    reader.drain(applier.check_cancel)
    return ApplyResult(
        src.digest(),
        src.size,
        tuple(applier.implied or ()),
        frozenset(applier.relisted or ()),
        frozenset(applier.whiteouts or ()),
        frozenset(applier.opaques or ()),
        applier.markers_droppable,
    )


def drop_overlay_markers(root: Path | str, result: ApplyResult) -> None:
    """Turn a layer applied in overlay form (``defer_parents``) into what a naive apply
    onto an empty directory gives: the first layer of a chain. Blocking.

    On an empty root a naive whiteout only deletes what the layer itself made before it
    (which the overlay form deleted too) and an opaque marker deletes nothing the layer
    did not write; so the whiteout devices still standing go, and the opaque xattrs.
    """
    if not result.markers_droppable:
        raise ArchiveError("this layer's opaque markers do not convert to a naive apply")
    top = os.path.abspath(root)
    for rel in result.whiteouts:
        path = top + "/" + rel
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
            os.unlink(path)
    for rel in result.opaques:
        path = top + "/" + rel if rel else top
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, OSError):
            os.removexattr(path, OVERLAY_OPAQUE_XATTR, follow_symlinks=False)


def copy_implied_parents(
    root: Path | str,
    implied: Sequence[str],
    lower_dirs: Sequence[Path | str],
    relisted: Collection[str] = (),
) -> None:
    """Give the implied parents of a deferred apply what a direct apply onto
    ``lower_dirs`` would have given them. Blocking.

    A direct apply gives a directory it creates the attributes of the same directory in
    the first lower layer that has that path; else it keeps the defaults, but a
    directory made inside a setgid one takes that one's group (the kernel's rule) — as
    the parent was *when the child was made*, which for an implied parent is what the
    direct apply had given it then. ``relisted`` directories took their attributes from
    their own entry later, and only serve as parents here. Times of modification stay:
    entries created inside set them.
    """
    applier = _Applier(os.path.abspath(root), True, [os.path.abspath(p) for p in lower_dirs], None)
    # What the direct apply gave each implied directory when it made it: (mode, gid).
    made: dict[str, tuple[int, int]] = {}
    for rel in implied:
        lower = applier.lower_dir(rel)
        inherited: int | None = None
        if lower is not None:
            made[rel] = (stat.S_IMODE(lower[1].st_mode), lower[1].st_gid)
        else:
            parent = made.get(rel.rpartition("/")[0])
            # (A parent not in ``made`` is the root, or was listed before this child
            # was made: the staging's kernel applied the same rule already.)
            if parent is not None and parent[0] & stat.S_ISGID:
                inherited = parent[1]
            made[rel] = (0o755, 0 if inherited is None else inherited)
        if rel in relisted:
            continue
        path = applier.root + "/" + rel
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            continue  # removed again later in the layer
        if not stat.S_ISDIR(st.st_mode):
            continue
        if lower is not None:
            copy_dir_info(lower[0], path)
            os.utime(path, ns=(lower[1].st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
        elif inherited is not None and st.st_gid != inherited:
            os.chown(path, -1, inherited, follow_symlinks=False)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)


class _Applier:
    def __init__(
        self, root: str, overlay: bool, parents: list[str], cancel: threading.Event | None
    ) -> None:
        self.root = root
        self.overlay = overlay
        self.parents = parents
        self.cancel = cancel
        # Paths written by this layer: a naive opaque marker keeps them, even when the
        # marker comes after them in the archive.
        self.unpacked: set[str] = set()
        self.dirs: list[tuple[list[str], Header]] = []
        # Set when parents are deferred: implied directories by relative path, in order,
        # and those a later entry listed.
        self.implied: dict[str, None] | None = None
        self.relisted: set[str] | None = None
        self.whiteouts: set[str] | None = None
        self.opaques: set[str] | None = None
        self.markers_droppable = True

    def check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise ArchiveCanceled("layer apply canceled")

    def entry(self, hdr: Header, reader: TarReader) -> None:
        if hdr.type not in _SUPPORTED:
            raise InvalidArchive(f"unhandled tar header type {hdr.type!r} for {hdr.name!r}")
        if not (0 <= hdr.uid <= _MAX_ID and 0 <= hdr.gid <= _MAX_ID):
            raise InvalidArchive(f"{hdr.name!r}: uid/gid {hdr.uid}:{hdr.gid} out of range")
        comps = clean_components(hdr.name)
        if not comps:
            log.debug("file %r ignored: resolved to root", hdr.name)
            return
        if hdr.type in _DEVICES and _in_user_namespace():
            log.warning("file %r ignored: device nodes cannot be created in a userns", hdr.name)
            return
        base = comps[-1]
        ppath = root_path(self.root, comps[:-1])
        path = ppath + "/" + base
        if ppath != self.root:
            self._mkparent(ppath)
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(hdr, ppath, base)
            return
        try:
            st: os.stat_result | None = os.lstat(path)
        except FileNotFoundError:
            st = None
        is_dir = st is not None and stat.S_ISDIR(st.st_mode)
        if st is not None and not (is_dir and hdr.type == tarfile.DIRTYPE):
            remove_all(path)
        self._create(hdr, path, reader, merge_dir=is_dir)
        if self.whiteouts:
            self.whiteouts.discard(path[len(self.root) + 1 :])
        if hdr.type == tarfile.DIRTYPE:
            self.dirs.append((comps, hdr))
            rel = path[len(self.root) + 1 :]
            if self.implied and rel in self.implied and self.relisted is not None:
                self.relisted.add(rel)  # its own entry gave it its attributes
        self.unpacked.add(path)

    def _mkparent(self, ppath: str) -> None:
        """Create the missing directories of ``ppath`` (resolved already), iteratively."""
        missing: list[str] = []
        current = ppath
        while current != self.root:
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                missing.append(current)
                current = os.path.dirname(current)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ArchiveError(f"mkparent {current!r}: not a directory")
            break
        for directory in reversed(missing):
            os.mkdir(directory, 0o755)
            os.chmod(directory, 0o755)  # not masked by the umask, as containerd's mkdir
            if self.implied is not None:
                self.implied[directory[len(self.root) + 1 :]] = None
            else:
                self.copy_parent_info(directory)

    def lower_dir(self, rel: str) -> tuple[str, os.stat_result] | None:
        """The directory ``rel`` of the first lower layer that has that path, if it is a
        directory there (a non-directory hides the layers below it)."""
        for lower in self.parents:
            candidate = root_path(lower, rel)
            try:
                st = os.lstat(candidate)
            except (FileNotFoundError, NotADirectoryError):
                continue
            return (candidate, st) if stat.S_ISDIR(st.st_mode) else None
        return None

    def copy_parent_info(self, directory: str) -> None:
        found = self.lower_dir(directory[len(self.root) + 1 :])
        if found is not None:
            copy_dir_info(found[0], directory)

    def _whiteout(self, hdr: Header, ppath: str, base: str) -> None:
        if base == WHITEOUT_OPAQUE:
            if self.overlay:
                os.setxattr(ppath, OVERLAY_OPAQUE_XATTR, b"y", follow_symlinks=False)
                if self.opaques is not None:
                    self.opaques.add(ppath[len(self.root) + 1 :])
                    if self.markers_droppable and self._not_unpacked(ppath):
                        self.markers_droppable = False
            else:
                self._remove_not_unpacked(ppath)
            return
        original = base[len(WHITEOUT_PREFIX) :]
        if original in ("", ".", ".."):
            raise InvalidArchive(f"invalid whiteout name: {base}")
        target = ppath + "/" + original
        remove_all(target)
        if self.overlay:
            os.mknod(target, stat.S_IFCHR, 0)
            os.chown(target, hdr.uid, hdr.gid, follow_symlinks=False)
            if self.whiteouts is not None:
                self.whiteouts.add(target[len(self.root) + 1 :])

    def _remove_not_unpacked(self, directory: str) -> None:
        """Naive opaque directory: delete every entry this layer did not write."""
        for path in self._not_unpacked(directory):
            remove_all(path)

    def _not_unpacked(self, directory: str) -> list[str]:
        """The entries below ``directory`` this layer did not write (not below those)."""
        found: list[str] = []
        stack = [directory]
        while stack:
            current = stack.pop()
            try:
                it = os.scandir(current)
            except FileNotFoundError:
                continue
            with it:
                for entry in it:
                    if entry.path not in self.unpacked:
                        found.append(entry.path)
                    elif entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        return found

    def _create(self, hdr: Header, path: str, reader: TarReader, *, merge_dir: bool) -> None:
        kind = hdr.type
        mtime = bound_time_ns(hdr.mtime_ns)
        atime = mtime if hdr.atime_ns is None else max(hdr.atime_ns, hdr.mtime_ns)
        times = (bound_time_ns(atime), mtime)
        if kind in _REGULAR or kind == tarfile.DIRTYPE:
            if kind == tarfile.DIRTYPE:
                if not merge_dir:
                    os.mkdir(path, 0o700)
                flags = os.O_RDONLY | os.O_DIRECTORY
            else:
                flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if kind != tarfile.DIRTYPE:
                    self._copy_data(reader, fd, hdr.size)
                os.fchown(fd, hdr.uid, hdr.gid)
                for key, value in hdr.xattrs.items():
                    set_xattr(fd, key, value, special=False)
                os.fchmod(fd, hdr.mode)  # after chown, which clears setuid/setgid
                os.utime(fd, ns=times)
            finally:
                os.close(fd)
            return
        if kind == tarfile.SYMTYPE:
            # Stored verbatim: only ever followed later through root_path.
            os.symlink(hdr.linkname, path)
        elif kind == tarfile.LNKTYPE:
            target = hardlink_root_path(self.root, hdr.linkname)
            os.link(target, path, follow_symlinks=False)
        else:
            self._mknod(hdr, path)
        os.chown(path, hdr.uid, hdr.gid, follow_symlinks=False)
        mode = os.lstat(path).st_mode
        special = not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))
        for key, value in hdr.xattrs.items():
            set_xattr(path, key, value, special=special)
        lchmod(path, hdr.mode)
        os.utime(path, ns=times, follow_symlinks=False)

    def _mknod(self, hdr: Header, path: str) -> None:
        if hdr.type == tarfile.FIFOTYPE:
            os.mkfifo(path, 0o600)
            return
        if not (0 <= hdr.devmajor <= _MAX_DEV and 0 <= hdr.devminor <= _MAX_DEV):
            raise InvalidArchive(
                f"{hdr.name!r}: device number {hdr.devmajor}:{hdr.devminor} out of range"
            )
        device = os.makedev(hdr.devmajor, hdr.devminor)
        os.mknod(path, _DEVICES[hdr.type] | 0o600, device)

    def _copy_data(self, reader: TarReader, fd: int, size: int) -> None:
        remaining = size
        while remaining > 0:
            self.check_cancel()
            chunk = reader.read(min(_CHUNK, remaining))
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
            remaining -= len(chunk)

    def finish_dirs(self) -> None:
        """Directory times last: creating entries inside them bumped their mtime."""
        for comps, hdr in self.dirs:
            self.check_cancel()
            path = root_path(self.root, comps[:-1]) + "/" + comps[-1]
            try:
                st = os.lstat(path)
            except (FileNotFoundError, NotADirectoryError):
                continue  # removed again later in this layer
            if not stat.S_ISDIR(st.st_mode):
                continue
            mtime = bound_time_ns(hdr.mtime_ns)
            atime = mtime if hdr.atime_ns is None else max(hdr.atime_ns, hdr.mtime_ns)
            os.utime(path, ns=(bound_time_ns(atime), mtime), follow_symlinks=False)
