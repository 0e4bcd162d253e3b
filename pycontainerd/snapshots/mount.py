"""Mounts: the ``Mount`` type snapshotters return, and the syscalls that perform them.

``Mount`` mirrors ``containerd.types.Mount``. ``mount_all`` / ``unmount`` / ``temp_mount``
are synchronous helpers (call them from a worker thread) built on libc's ``mount(2)`` and
``umount2(2)`` through ctypes, with containerd's option parsing (``mount/mount_linux.go``):
fstab-style flags become ``MS_*`` bits, everything else is filesystem data; a read-only
bind is remounted read-only because the kernel ignores ``MS_RDONLY`` on the first bind.

Overlay mounts of many layers can exceed the one page the kernel accepts for mount data.
Like containerd, the lowerdirs are then rewritten relative to their common parent and the
mount is made from inside that directory. The working directory is process-wide and the
daemon is threaded, so that mount runs in a short-lived thread with its own filesystem
context (``unshare(CLONE_FS)``) rather than changing the daemon's directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import logging
import os
import posixpath
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

__all__ = ["Mount", "libc", "mount_all", "option_value", "temp_mount", "unmount", "unmount_all"]

log = logging.getLogger(__name__)

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
MNT_DETACH = 0x2

_PROPAGATION = MS_SHARED | MS_PRIVATE | MS_SLAVE | MS_UNBINDABLE

# option -> (clears the flag?, flag)
_FLAGS: dict[str, tuple[bool, int]] = {
    "async": (True, MS_SYNCHRONOUS),
    "atime": (True, MS_NOATIME),
    "bind": (False, MS_BIND),
    "defaults": (False, 0),
    "dev": (True, MS_NODEV),
    "diratime": (True, MS_NODIRATIME),
    "dirsync": (False, MS_DIRSYNC),
    "exec": (True, MS_NOEXEC),
    "mand": (False, MS_MANDLOCK),
    "noatime": (False, MS_NOATIME),
    "nodev": (False, MS_NODEV),
    "nodiratime": (False, MS_NODIRATIME),
    "noexec": (False, MS_NOEXEC),
    "nomand": (True, MS_MANDLOCK),
    "norelatime": (True, MS_RELATIME),
    "nostrictatime": (True, MS_STRICTATIME),
    "nosuid": (False, MS_NOSUID),
    "rbind": (False, MS_BIND | MS_REC),
    "relatime": (False, MS_RELATIME),
    "remount": (False, MS_REMOUNT),
    "ro": (False, MS_RDONLY),
    "rw": (True, MS_RDONLY),
    "strictatime": (False, MS_STRICTATIME),
    "suid": (True, MS_NOSUID),
    "sync": (False, MS_SYNCHRONOUS),
    "private": (False, MS_PRIVATE),
    "rprivate": (False, MS_PRIVATE | MS_REC),
    "shared": (False, MS_SHARED),
    "rshared": (False, MS_SHARED | MS_REC),
    "slave": (False, MS_SLAVE),
    "rslave": (False, MS_SLAVE | MS_REC),
    "unbindable": (False, MS_UNBINDABLE),
    "runbindable": (False, MS_UNBINDABLE | MS_REC),
}

_PAGESIZE = os.sysconf("SC_PAGESIZE")

# One libc handle for the daemon's calls (mounts here; namespaces in ``network.netns``,
# writeback in ``content.local``, malloc settings in ``server.memory``);
# ctypes keeps errno per thread, so sharing it is safe. Named directly:
# ctypes.util.find_library runs ldconfig (~40 ms of daemon start-up).
libc = _libc = ctypes.CDLL("libc.so.6", use_errno=True)
_libc.mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_char_p,
]
_libc.mount.restype = ctypes.c_int
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.umount2.restype = ctypes.c_int
_libc.unshare.argtypes = [ctypes.c_int]
_libc.unshare.restype = ctypes.c_int
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
_libc.setns.restype = ctypes.c_int
_CLONE_FS = 0x200


@dataclass(frozen=True, slots=True)
class Mount:
    """One mount, as in ``containerd.types.Mount``: type, source and fstab-style options."""

    type: str
    source: str
    target: str = ""
    options: tuple[str, ...] = ()

    def mount(self, target: str | os.PathLike[str]) -> None:
        """Mount onto ``target``; OSError (with the errno) on failure."""
        _mount_one(self, os.fspath(target))


def option_value(options: Sequence[str], key: str) -> str | None:
    """The value of ``key=value`` among mount ``options`` (``upperdir``, ``lowerdir``)."""
    prefix = key + "="
    for o in options:
        if o.startswith(prefix):
            return o[len(prefix) :]
    return None


def parse_options(options: Sequence[str]) -> tuple[int, str]:
    """Split fstab-style options into ``MS_*`` flags and the filesystem data string."""
    flags = 0
    data: list[str] = []
    for opt in options:
        entry = _FLAGS.get(opt)
        if entry is not None and entry[1] != 0:
            clear, flag = entry
            flags = flags & ~flag if clear else flags | flag
        elif entry is None:
            data.append(opt)
    return flags, ",".join(data)


def _sys_mount(source: str, target: str, fstype: str, flags: int, data: str) -> None:
    rc = _libc.mount(
        source.encode(), target.encode(), fstype.encode(), flags, data.encode() if data else None
    )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} {source!r} on {target!r}: {os.strerror(err)}")


def _mount_one(m: Mount, target: str) -> None:
    options: Sequence[str] = m.options
    chdir = ""
    # 512 bytes of slack as containerd keeps for the rest of the option string.
    if m.type == "overlay" and sum(len(o) for o in options) >= _PAGESIZE - 512:
        chdir, options = compact_lowerdir(options)
    flags, data = parse_options(options)
    if len(data) > _PAGESIZE:
        raise OSError(errno.E2BIG, f"mount options too long ({len(data)} bytes)")
    oflags = flags & ~_PROPAGATION
    if not flags & MS_REMOUNT or data:
        if chdir:
            _mount_in_dir(chdir, m.source, target, m.type, oflags, data)
        else:
            _sys_mount(m.source, target, m.type, oflags, data)
    if flags & _PROPAGATION:
        _sys_mount("", target, "", flags & (_PROPAGATION | MS_REC | MS_SILENT), "")
    if oflags & (MS_BIND | MS_RDONLY) == MS_BIND | MS_RDONLY:
        # A bind mount ignores MS_RDONLY; only a remount makes it read-only.
        _sys_mount("", target, "", oflags | MS_REMOUNT, "")


def compact_lowerdir(options: Sequence[str]) -> tuple[str, list[str]]:
    """Rewrite ``lowerdir=`` relative to the lowerdirs' common parent directory.

    Returns ``(directory, options)``; ``("", options)`` when nothing can be shortened.
    The common parent is compared by path component (for ``<root>/snapshots/<id>/fs``
    it is ``<root>/snapshots``), never by characters, which could end inside an id.
    """
    idx = next((i for i, o in enumerate(options) if o.startswith("lowerdir=")), -1)
    if idx == -1:
        return "", list(options)
    dirs = options[idx][len("lowerdir=") :].split(":")
    if len(dirs) == 1:
        return "", list(options)
    try:
        common = posixpath.commonpath(dirs)
    except ValueError:  # relative and absolute paths mixed
        return "", list(options)
    if common in ("", "/") or common in dirs:
        return "", list(options)
    common += "/"
    rel = [d[len(common) :] for d in dirs]
    out = [o for i, o in enumerate(options) if i != idx]
    out.append("lowerdir=" + ":".join(rel))
    return common, out


def _mount_in_dir(chdir: str, source: str, target: str, fstype: str, flags: int, data: str) -> None:
    """Mount with relative paths in ``data`` resolved against ``chdir``.

    The working directory is shared by all threads, so the mount runs in a fresh thread
    that first unshares its filesystem context (``unshare(CLONE_FS)``): its ``chdir``
    is then invisible to the rest of the daemon, and the thread ends right after.
    """
    if not os.path.isdir(chdir):
        raise OSError(errno.ENOTDIR, f"mount: {chdir!r} is not a directory")
    target = os.path.abspath(target)
    failure: list[BaseException] = []

    def run() -> None:
        try:
            if _libc.unshare(_CLONE_FS) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"unshare(CLONE_FS): {os.strerror(err)}")
            os.chdir(chdir)
            _sys_mount(source, target, fstype, flags, data)
        except BaseException as exc:  # re-raised in the caller
            failure.append(exc)

    t = threading.Thread(target=run, name="mount-chdir", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]


def mount_all(mounts: Sequence[Mount], target: str | os.PathLike[str]) -> None:
    """Mount each of ``mounts`` onto ``target`` in order (containerd's ``mount.All``)."""
    for m in mounts:
        m.mount(target)


def unmount(target: str | os.PathLike[str], flags: int = 0) -> None:
    """Unmount ``target`` once; EBUSY is retried briefly, "not a mount point" ignored."""
    path = os.fspath(target).encode()
    for _ in range(50):
        if _libc.umount2(path, flags) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EINVAL:
            return
        if err != errno.EBUSY:
            raise OSError(err, f"unmount {os.fspath(target)!r}: {os.strerror(err)}")
        time.sleep(0.05)
    raise OSError(errno.EBUSY, f"unmount {os.fspath(target)!r}: {os.strerror(errno.EBUSY)}")


def unmount_all(target: str | os.PathLike[str], flags: int = 0) -> None:
    """Unmount every mount stacked on ``target``; a missing path is not an error."""
    path = os.fspath(target)
    if not path or not os.path.exists(path):
        return
    b = path.encode()
    while True:
        if _libc.umount2(b, flags) == 0:
            continue
        err = ctypes.get_errno()
        if err == errno.EINVAL:  # not (or no longer) a mount point: done
            return
        if err == errno.EBUSY:
            unmount(path, flags)  # retries, then raises if still busy
            continue
        raise OSError(err, f"unmount {path!r}: {os.strerror(err)}")


@contextlib.contextmanager
def temp_mount(
    mounts: Sequence[Mount], root: str | os.PathLike[str] | None = None
) -> Iterator[Path]:
    """Mount ``mounts`` on a fresh temporary directory and always unmount and remove it."""
    tmp = tempfile.mkdtemp(prefix="pycontainerd-mount-", dir=root)
    try:
        try:
            mount_all(mounts, tmp)
        except BaseException:
            unmount_all(tmp)
            raise
        try:
            yield Path(tmp)
        finally:
            unmount_all(tmp)
    finally:
        try:
            os.rmdir(tmp)
        except OSError as exc:
            log.warning("temp mount %s not removed: %s", tmp, exc)
