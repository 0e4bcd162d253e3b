"""Filesystem primitives for the unpacker that never follow a final symlink.

Each helper states what it does with a symlink in the last component: ``remove_all``
removes the link, ``lchmod`` skips it, xattr and time helpers act on the link itself. The
parent of every path handed in here has already been resolved inside the root by
:func:`pycontainerd.archive.rootpath.root_path`. Deep trees are walked iteratively
(``shutil.rmtree`` recurses and holds one fd per level).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

__all__ = [
    "MAX_TIME_NS",
    "bound_time_ns",
    "copy_dir_info",
    "lchmod",
    "remove_all",
    "set_xattr",
]

log = logging.getLogger(__name__)

# Go's time.Unix(0, 1<<63-1), the largest time containerd's chtimes accepts.
MAX_TIME_NS = (1 << 63) - 1


def bound_time_ns(ns: int) -> int:
    """containerd's boundTime: times before the epoch or past 2262 become the epoch."""
    return 0 if ns < 0 or ns > MAX_TIME_NS else ns


def remove_all(path: str) -> None:
    """``rm -rf path`` without following symlinks anywhere and without recursion."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        return
    stack: list[tuple[str, bool]] = [(path, False)]
    while stack:
        current, emptied = stack.pop()
        if emptied:
            os.rmdir(current)
            continue
        stack.append((current, True))
        with os.scandir(current) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, False))
                else:
                    os.unlink(entry.path)


def lchmod(path: str, mode: int) -> None:
    """chmod that never follows a symlink: symlinks are skipped (Linux has no link modes).

    This is what keeps a hardlink to an absolute symlink plus chmod (CVE-2021-32760) from
    reaching the host file.
    """
    try:
        os.chmod(path, mode, follow_symlinks=False)
        return
    except NotImplementedError:
        pass  # glibc reports EOPNOTSUPP for a symlink, or has no fchmodat emulation
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if stat.S_ISLNK(os.fstat(fd).st_mode):
            return
        # An O_PATH fd pins the inode; its /proc magic link reaches exactly that inode.
        os.chmod(f"/proc/self/fd/{fd}", mode)
    finally:
        os.close(fd)


def set_xattr(target: str | int, key: str, value: bytes, *, special: bool) -> bool:
    """Set one xattr on a path (not followed) or fd; False when skipped with a warning.

    Mirrors containerd: ``trusted.*`` is never taken from an archive, ENOTSUP is skipped,
    and EPERM on ``user.*`` is skipped for non-regular, non-directory files (the kernel only
    allows user xattrs on those); ``special`` says the target is such a file.
    """
    if key.startswith("trusted."):
        log.warning("ignored xattr %s in archive: admin attributes not supported", key)
        return False
    try:
        if isinstance(target, int):
            os.setxattr(target, key, value)
        else:
            os.setxattr(target, key, value, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            log.warning("ignored xattr %s in archive: %s", key, exc.strerror)
            return False
        if exc.errno == errno.EPERM and key.startswith("user.") and special:
            log.warning("ignored xattr %s in archive: %s", key, exc.strerror)
            return False
        raise
    return True


def copy_dir_info(src: str, dst: str) -> None:
    """Give the directory ``dst`` the owner, mode, times and xattrs of ``src``.

    Used for parents implied by an overlay layer, copied from the same directory in a
    lower layer (containerd's ``WithParents``). ``trusted.*`` is not copied up.
    """
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=False)
    os.chmod(dst, stat.S_IMODE(st.st_mode))
    try:
        keys = os.listxattr(src, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
            raise
        keys = []
    for key in keys:
        if key.startswith("trusted."):
            continue
        try:
            value = os.getxattr(src, key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENODATA):
                continue
            raise
        os.setxattr(dst, key, value, follow_symlinks=False)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=False)
