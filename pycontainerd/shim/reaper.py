"""The shim's single reaper: every ``waitpid`` of the process happens here.

The shim is a child subreaper, so containers' init and exec processes become its children
once runc exits. One SIGCHLD handler on the event loop collects every exit with
``waitpid(-1, WNOHANG)`` and resolves the future of that pid. An exit can arrive before
anyone watches its pid (a container that dies before its pid file is read): it is kept as
*unclaimed* for a while and handed to the first watcher. Programs the shim runs itself
(runc) are started here with ``posix_spawn`` — never through asyncio's child watcher, which
would race this loop for the same exits. The reaper is also a ``runc.Runner``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import signal
import time
from typing import TYPE_CHECKING

from pycontainerd.runtime.runc import Result, Stdio

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Reaper", "exit_status", "set_subreaper"]

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
_UNCLAIMED_TTL = 60.0
# Dispositions a child must not inherit: Python ignores SIGPIPE and SIGXFSZ.
_RESET_SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM, signal.SIGCHLD)


def set_subreaper() -> None:
    """Make orphaned descendants children of this process (``PR_SET_CHILD_SUBREAPER``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}")


def exit_status(wait_status: int) -> int:
    """A ``waitpid`` status as containerd reports it: the exit code, or 128 + signal."""
    code = os.waitstatus_to_exitcode(wait_status)
    return code if code >= 0 else 128 - code


async def _read_all(fd: int) -> bytes:
    """Read a pipe to EOF without blocking the loop, then close it."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    chunks: list[bytes] = []
    done: asyncio.Future[None] = loop.create_future()

    def readable() -> None:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                loop.remove_reader(fd)
                if not done.done():
                    done.set_result(None)
                return
            chunks.append(data)

    loop.add_reader(fd, readable)
    try:
        await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return b"".join(chunks)


def wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to a non-blocking fd, waiting for room as needed (fd stays open)."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_writer(fd, wake, ready)
            try:
                await ready
            finally:
                loop.remove_writer(fd)


class Reaper:
    """Owns SIGCHLD: ``watch(pid)`` gives a future of that child's exit status."""

    def __init__(self) -> None:
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._unclaimed: dict[int, tuple[int, float]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._devnull = -1

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # children that exited before the handler was installed

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
        if self._devnull >= 0:
            os.close(self._devnull)
            self._devnull = -1

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except InterruptedError:
                continue
            if pid == 0:
                return
            self._exited(pid, exit_status(status))

    def _exited(self, pid: int, status: int) -> None:
        fut = self._waiting.pop(pid, None)
        if fut is not None:
            if not fut.done():
                fut.set_result(status)
            return
        now = time.monotonic()
        self._unclaimed[pid] = (status, now)
        if len(self._unclaimed) > 64:
            for p, (_s, t) in list(self._unclaimed.items()):
                if now - t > _UNCLAIMED_TTL:
                    del self._unclaimed[p]

    def watch(self, pid: int) -> asyncio.Future[int]:
        """The future exit status of child ``pid`` (already resolved if it exited unclaimed)."""
        assert self._loop is not None, "reaper not started"
        fut = self._waiting.get(pid)
        if fut is not None:
            return fut
        fut = self._loop.create_future()
        early = self._unclaimed.pop(pid, None)
        if early is not None:
            fut.set_result(early[0])
        else:
            self._waiting[pid] = fut
        return fut

    def forget(self, pid: int) -> None:
        """Stop watching ``pid`` (its exit, if any, is then dropped as unclaimed)."""
        fut = self._waiting.pop(pid, None)
        if fut is not None and not fut.done():
            fut.cancel()

    def spawn(
        self, argv: Sequence[str], stdin: int, stdout: int, stderr: int
    ) -> tuple[int, asyncio.Future[int]]:
        """Start ``argv`` with the given fds as 0, 1, 2 and nothing else inherited.

        Every other descriptor of the shim is close-on-exec (Python's default), so only
        these three reach the child. The pid is watched before any exit can be reaped
        (SIGCHLD is handled on this same loop, after this returns).
        """
        actions = [
            (os.POSIX_SPAWN_DUP2, stdin, 0),
            (os.POSIX_SPAWN_DUP2, stdout, 1),
            (os.POSIX_SPAWN_DUP2, stderr, 2),
        ]
        pid = os.posix_spawnp(
            argv[0],
            list(argv),
            os.environ,
            file_actions=actions,
            setsigdef=_RESET_SIGNALS,
            setsigmask=(),
        )
        self._unclaimed.pop(pid, None)  # a stale exit of a recycled pid is not this child's
        return pid, self.watch(pid)

    async def run(
        self, argv: Sequence[str], *, stdio: Stdio | None = None, input: bytes | None = None
    ) -> Result:
        """:class:`Runner`: run ``argv`` to completion through this reaper."""
        null = self._devnull
        if stdio is not None:
            _pid, exited = self.spawn(
                argv,
                stdio.stdin if stdio.stdin is not None else null,
                stdio.stdout if stdio.stdout is not None else null,
                stdio.stderr if stdio.stderr is not None else null,
            )
            return Result(await exited)
        out_r, out_w = os.pipe2(os.O_CLOEXEC)
        err_r, err_w = os.pipe2(os.O_CLOEXEC)
        in_r, in_w = os.pipe2(os.O_CLOEXEC) if input is not None else (null, -1)
        try:
            _pid, exited = self.spawn(argv, in_r, out_w, err_w)
        except OSError:
            for fd in (out_r, err_r, in_w):
                if fd >= 0:
                    os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(err_w)
            if in_w >= 0:
                os.close(in_r)
        if in_w >= 0:
            os.set_blocking(in_w, False)
            try:
                with contextlib.suppress(BrokenPipeError):
                    await write_all(in_w, input or b"")
            finally:
                os.close(in_w)
        out, err = await asyncio.gather(_read_all(out_r), _read_all(err_r))
        return Result(await exited, out, err)


def kill_quietly(pid: int, sig: int) -> bool:
    """``kill(pid, sig)``; False when the process is gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    except OSError as exc:
        if exc.errno == errno.ESRCH:
            return False
        raise
    return True
