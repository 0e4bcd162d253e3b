"""Named network namespaces, bind-mounted as files under one directory.

A namespace lives as long as something holds it: a process inside it, an open fd, or a
bind mount of ``/proc/<pid>/ns/net`` on a file. We keep each one as a bind mount at
``<dir>/<name>`` (like ``ip netns``, but in our own directory, ``/run/pycontainerd/netns``
by default, so our names never clash with the admin's ``/var/run/netns``). pyroute2 does
the unshare and the mount in a forked child, so the calling thread never changes
namespace; code that must run *inside* a namespace goes through :func:`run_in_netns`,
which enters it from a thread of its own that ends right after.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pycontainerd import identifiers
from pycontainerd.errdefs import AlreadyExists, InvalidArgument, NotFound, PycdError

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = [
    "DEFAULT_NETNS_DIR",
    "NetnsStore",
    "is_netns",
    "run_in_netns",
    "unmount_netns_dir",
]

log = logging.getLogger(__name__)

DEFAULT_NETNS_DIR = Path("/run/pycontainerd/netns")
_MNT_DETACH = 2
_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL("libc.so.6", use_errno=True)


def _netns_file_kind(path: Path) -> str | None:
    """``"net"`` for a bound namespace, ``"file"`` for a leftover mount point, else None."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        # NS_GET_NSTYPE answers only on nsfs files (ENOTTY elsewhere): the one reliable
        # test, since a bound namespace reads back as its own path in /proc/self/fd.
        kind = fcntl.ioctl(fd, _NS_GET_NSTYPE)
    except OSError:
        return "file"
    finally:
        os.close(fd)
    return "net" if kind == _CLONE_NEWNET else "file"


def is_netns(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a bound network namespace (blocking; a cheap syscall pair)."""
    return _netns_file_kind(Path(path)) == "net"


def _remove_sync(path: Path) -> bool:
    """Unmount and unlink ``path``; False when it was already gone."""
    if not path.exists():
        return False
    # MNT_DETACH: a process still inside keeps the namespace alive, as the kernel intends;
    # the name is gone either way, so the path can be reused at once.
    if _libc().umount2(str(path).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, os.strerror(err), str(path))
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


class NetnsStore:
    """Create, list and remove named network namespaces under one directory.

    Names must be identifiers (a container or sandbox id is the natural name: reclaim
    treats a namespace whose name is no live id as leaked).
    """

    def __init__(self, directory: str | os.PathLike[str] = DEFAULT_NETNS_DIR) -> None:
        self.directory = Path(directory)

    def path(self, name: str) -> Path:
        return self.directory / identifiers.validate(name)

    async def create(self, name: str) -> Path:
        """Create namespace ``name`` with only ``lo`` (down); AlreadyExists when taken."""
        path = self.path(name)
        return await asyncio.to_thread(self._create_sync, path)

    def _create_sync(self, path: Path) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        kind = _netns_file_kind(path)
        if kind == "net":
            raise AlreadyExists(f"network namespace {path.name!r}")
        if kind == "file":
            # A mount point whose namespace is gone (a reboot under a persistent directory,
            # a crash mid-create): the name is free again.
            _remove_sync(path)
        try:
            # pyroute2 forks a child that unshares CLONE_NEWNET and bind-mounts its
            # /proc/self/ns/net on the path; the directory itself becomes a shared mount
            # point (as iproute2 does) so the bind propagates into other mount namespaces.
            from pyroute2 import netns as pr_netns  # imported on use: ~120 ms

            pr_netns.create(str(path))
        except FileExistsError as exc:
            raise AlreadyExists(f"network namespace {path.name!r}") from exc
        except Exception as exc:
            # A failure after the mount point was made leaves an empty file behind.
            _remove_sync(path)
            raise PycdError(f"create network namespace {path}: {exc}") from exc
        return path

    async def remove(self, path: str | os.PathLike[str]) -> bool:
        """Unmount and delete the namespace file; False when it did not exist."""
        return await asyncio.to_thread(self._remove_checked, Path(path))

    def _remove_checked(self, path: Path) -> bool:
        # Only our own directory: a caller's mistake must never unmount something else.
        if path.parent.resolve() != self.directory.resolve():
            raise InvalidArgument(f"{path} is not a namespace of {self.directory}")
        return _remove_sync(path)

    async def list(self) -> dict[str, Path]:
        """Names and paths of the namespace files in the directory."""
        return await asyncio.to_thread(self._list_sync)

    def _list_sync(self) -> dict[str, Path]:
        try:
            names = os.listdir(self.directory)
        except FileNotFoundError:
            return {}
        return {n: self.directory / n for n in sorted(names)}

    async def exists(self, path: str | os.PathLike[str]) -> bool:
        """True when ``path`` is a bound network namespace."""
        kind = await asyncio.to_thread(_netns_file_kind, Path(path))
        return kind == "net"


async def run_in_netns(path: str | os.PathLike[str], fn: Callable[[], T]) -> T:
    """Run the blocking ``fn`` inside namespace ``path`` and return its result.

    The call happens on a fresh thread that enters the namespace with setns(2) and then
    ends, so no pooled thread (and never the event loop's) is left in a foreign namespace.
    Raises NotFound when ``path`` is no namespace.
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def deliver(ok: bool, value: object) -> None:
        if fut.done():
            return
        if ok:
            fut.set_result(value)  # type: ignore[arg-type]
        else:
            assert isinstance(value, BaseException)
            fut.set_exception(value)

    def body() -> None:
        try:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError as exc:
                raise NotFound(f"network namespace {os.fspath(path)!r}") from exc
            try:
                from pyroute2 import netns as pr_netns

                pr_netns.setns(fd)
            finally:
                os.close(fd)
            result = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=body, name="pcd-netns", daemon=True).start()
    return await fut


def unmount_netns_dir(directory: str | os.PathLike[str]) -> None:
    """Remove every namespace under ``directory`` and undo its self bind mount.

    For tests and tear-down of a throw-away directory: pyroute2 turns the directory into
    a shared mount point of its own, which keeps it busy until it is unmounted.
    """
    d = Path(directory)
    if not d.is_dir():
        return
    for name in os.listdir(d):
        _remove_sync(d / name)
    libc = _libc()
    # The directory may be bind-mounted on itself more than once (one per create that
    # found it unshared); unmount until the kernel says it is no mount point.
    for _ in range(8):
        if libc.umount2(str(d).encode(), _MNT_DETACH) != 0:
            break
