"""Named network namespaces, bind-mounted as files under one directory.

A namespace lives as long as something holds it: a process inside it, an open fd, or a
bind mount of an ``ns/net`` file on a file. We keep each one as a bind mount at
``<dir>/<name>`` (like ``ip netns``, but in our own directory, ``/run/pycontainerd/netns``
by default, so our names never clash with the admin's ``/var/run/netns``). Creation
happens in-process, as containerd does it: a fresh thread unshares ``CLONE_NEWNET``
(which moves only that thread), bind-mounts its own ``ns/net`` on the file, switches
back and ends. No child process is forked and pyroute2 is not imported. Code that must
run *inside* a namespace goes through :func:`run_in_netns`, which enters it from a thread
of its own that also ends right after, so no pooled thread ever changes namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from pycontainerd import identifiers
from pycontainerd.errdefs import AlreadyExists, InvalidArgument, NotFound, PycdError
from pycontainerd.snapshots.mount import libc

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
_MS_BIND = 0x1000
_MS_REC = 0x4000
_MS_SHARED = 1 << 20
_NS_GET_NSTYPE = 0xB703  # _IO(0xb7, 0x3)
_CLONE_NEWNET = 0x40000000

# Directories this process has already made shared mount points, so each pays the two
# mount calls once, not per namespace; only unmount_netns_dir undoes it.
_shared_dirs: set[str] = set()
_shared_lock = threading.Lock()

# Paths being created right now. The stale-file clean-up in create must not mistake a
# concurrent create's fresh, still unbound file for a leftover and unlink it: the two
# would then both bind on the name, stacked.
_creating: set[Path] = set()
_creating_lock = threading.Lock()

T = TypeVar("T")


def _errno_error(what: str, path: str | os.PathLike[str]) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}", os.fspath(path))


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
    if libc.umount2(os.fsencode(path), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, os.strerror(err), str(path))
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _share_dir(directory: Path) -> None:
    """Make ``directory`` a shared mount point, as iproute2 (and pyroute2) do.

    The namespace binds then propagate into mount namespaces copied from ours later on
    (a container that gets the directory, ``unshare -m --propagation unchanged``), and
    their unmounts propagate too. A directory that is no mount point yet is first bound
    on itself, because only a mount point has a propagation type.
    """
    key = os.fspath(directory.resolve())
    with _shared_lock:
        # Under the lock, so concurrent first creates do not stack several self binds.
        if key in _shared_dirs:
            return
        target = os.fsencode(key)
        if libc.mount(b"none", target, None, _MS_SHARED | _MS_REC, None) != 0:
            if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point
                raise _errno_error("make shared", key)
            if libc.mount(target, target, None, _MS_BIND | _MS_REC, None) != 0:
                raise _errno_error("bind on itself", key)
            if libc.mount(b"none", target, None, _MS_SHARED | _MS_REC, None) != 0:
                raise _errno_error("make shared", key)
        _shared_dirs.add(key)


def _bind_new_netns(path: Path) -> None:
    """Bind a brand-new network namespace on the existing file ``path``.

    Runs on a thread started for this call alone: unshare(2) moves only the calling
    thread, which switches back with setns(2) before it ends. Should that switch fail,
    the thread still ends right after, so nothing else ever runs in the new namespace.
    Raises OSError (with errno) from whichever step failed.
    """
    failure: list[BaseException] = []

    def body() -> None:
        try:
            # The thread's own entry: /proc/self/ns/net is the main thread's namespace.
            own = f"/proc/self/task/{threading.get_native_id()}/ns/net"
            orig = os.open(own, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if libc.unshare(_CLONE_NEWNET) != 0:
                    raise _errno_error("unshare(CLONE_NEWNET)", path)
                try:
                    if libc.mount(os.fsencode(own), os.fsencode(path), None, _MS_BIND, None):
                        raise _errno_error("bind-mount namespace", path)
                finally:
                    if libc.setns(orig, _CLONE_NEWNET) != 0:
                        # Reported, and the caller undoes the mount: all or nothing.
                        failure.append(_errno_error("setns back to the original", path))
            finally:
                os.close(orig)
        except BaseException as exc:
            failure.append(exc)

    t = threading.Thread(target=body, name="pcd-netns-create", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]


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
        """Create namespace ``name`` with only ``lo`` (down) and return its path.

        Raises AlreadyExists when the name is taken, PycdError when a syscall fails
        (with the OSError as its cause); a failure leaves no file behind.
        """
        path = self.path(name)
        return await asyncio.to_thread(self._create_sync, path)

    def _create_sync(self, path: Path) -> Path:
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            _share_dir(self.directory)
        except OSError as exc:
            raise PycdError(f"prepare network namespace directory {self.directory}: {exc}") from exc
        key = path.resolve()
        with _creating_lock:
            if key in _creating:
                raise AlreadyExists(f"network namespace {path.name!r}")
            _creating.add(key)
        try:
            return self._create_claimed(path)
        finally:
            with _creating_lock:
                _creating.discard(key)

    def _create_claimed(self, path: Path) -> Path:
        kind = _netns_file_kind(path)
        if kind == "net":
            raise AlreadyExists(f"network namespace {path.name!r}")
        if kind == "file":
            # A mount point whose namespace is gone (a reboot under a persistent directory,
            # a crash mid-create): the name is free again.
            _remove_sync(path)
        try:
            # O_EXCL: of two concurrent creates of one name, exactly one gets the file.
            os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444))
        except FileExistsError as exc:
            raise AlreadyExists(f"network namespace {path.name!r}") from exc
        except OSError as exc:
            raise PycdError(f"create network namespace {path}: {exc}") from exc
        try:
            _bind_new_netns(path)
        except Exception as exc:
            # The file is ours (O_EXCL), so removing it cannot hit someone else's.
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


def _call_in_netns(path: str | os.PathLike[str], fn: Callable[[], T]) -> T:
    """On a thread of its own: enter namespace ``path``, call ``fn``, switch back."""
    orig = os.open(
        f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY | os.O_CLOEXEC
    )
    try:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise NotFound(f"network namespace {os.fspath(path)!r}") from exc
        try:
            if libc.setns(fd, _CLONE_NEWNET) != 0:
                err = _errno_error("setns", path)
                if err.errno == errno.EINVAL:  # an ordinary file, or another ns type
                    raise NotFound(f"network namespace {os.fspath(path)!r}") from err
                raise err
        finally:
            os.close(fd)
        try:
            return fn()
        finally:
            # Back before the result is handed over: Thread.join (and the caller's await)
            # return a moment before the OS thread is gone, and it must not linger inside.
            if libc.setns(orig, _CLONE_NEWNET) != 0:
                log.error("netns %s: setns back failed: %s", path, _errno_error("setns", path))
    finally:
        os.close(orig)


async def run_in_netns(path: str | os.PathLike[str], fn: Callable[[], T]) -> T:
    """Run the blocking ``fn`` inside namespace ``path`` and return its result.

    The call happens on a fresh thread that enters the namespace with setns(2), switches
    back before handing the result over, and ends, so no pooled thread (and never the
    event loop's) is ever in a foreign namespace. Raises NotFound when ``path`` is no
    namespace, and whatever ``fn`` raises.
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
            result = _call_in_netns(path, fn)
        except BaseException as exc:
            loop.call_soon_threadsafe(deliver, False, exc)
        else:
            loop.call_soon_threadsafe(deliver, True, result)

    threading.Thread(target=body, name="pcd-netns", daemon=True).start()
    return await fut


def unmount_netns_dir(directory: str | os.PathLike[str]) -> None:
    """Remove every namespace under ``directory`` and undo its self bind mount.

    For tests and tear-down of a throw-away directory: creating a namespace turns the
    directory into a shared mount point of its own, which keeps it busy until unmounted.
    """
    d = Path(directory)
    if not d.is_dir():
        return
    for name in os.listdir(d):
        _remove_sync(d / name)
    with _shared_lock:
        _shared_dirs.discard(os.fspath(d.resolve()))
        # Older code (pyroute2) bound the directory on itself once per create that found
        # it unshared; unmount until the kernel says it is no mount point.
        for _ in range(8):
            if libc.umount2(os.fsencode(d), _MNT_DETACH) != 0:
                break
