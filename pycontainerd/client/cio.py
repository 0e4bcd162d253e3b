"""Client-side stdio for tasks and execs: FIFOs in a private temp dir, and copiers.

As containerd's ``cio`` does, the client creates ``<id>-stdin``/``-stdout``/``-stderr``
FIFOs (only for the streams wanted; a terminal has no stderr) in a fresh 0700 directory
and passes their paths in ``Tasks.Create`` / ``Tasks.Exec``. Each FIFO is opened with a
*blocking* ``open(2)`` in a thread, which completes when the daemon's shim opens the
other end; copiers then move bytes between the FIFOs and the caller's sources and
sinks (or an in-memory capture). ``close()`` unblocks any open that never completed
(the task failed to start) by opening the other end itself, then removes the directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import AsyncIterable, Awaitable, Callable

__all__ = ["FIFO_ROOT", "TaskIO"]

FIFO_ROOT = Path("/run/pycontainerd/fifo")


class TaskIO:
    """The stdio of one process. Construct with ``await TaskIO.create(...)``."""

    def __init__(self, directory: Path, process_id: str, terminal: bool) -> None:
        self.dir = directory
        self.terminal = terminal
        self.stdin_path = ""
        self.stdout_path = ""
        self.stderr_path = ""
        self._id = process_id
        self._tasks: list[asyncio.Task[None]] = []
        self._stdin_task: asyncio.Task[None] | None = None
        self._stdout = bytearray()
        self._stderr = bytearray()

    @classmethod
    async def create(
        cls,
        process_id: str,
        *,
        stdin: bytes | AsyncIterable[bytes] | None = None,
        stdout: Callable[[bytes], Awaitable[None]] | None = None,
        stderr: Callable[[bytes], Awaitable[None]] | None = None,
        capture: bool = True,
        terminal: bool = False,
        fifo_dir: Path | None = None,
    ) -> TaskIO:
        """FIFOs for the wanted streams; stdout/stderr go to the sinks, else are captured
        (``capture=False`` with no sink: that stream is not connected at all)."""
        root = fifo_dir or FIFO_ROOT
        directory = Path(await asyncio.to_thread(_mkdtemp, root))
        io = cls(directory, process_id, terminal)
        want_out = stdout is not None or capture
        want_err = not terminal and (stderr is not None or capture)
        names = {
            "stdin": stdin is not None,
            "stdout": want_out,
            "stderr": want_err,
        }
        await asyncio.to_thread(_mkfifos, directory, process_id, names)
        if stdin is not None:
            io.stdin_path = str(directory / f"{process_id}-stdin")
            io._stdin_task = asyncio.create_task(io._feed(io.stdin_path, stdin))
        if want_out:
            io.stdout_path = str(directory / f"{process_id}-stdout")
            io._tasks.append(asyncio.create_task(io._drain(io.stdout_path, stdout, io._stdout)))
        if want_err:
            io.stderr_path = str(directory / f"{process_id}-stderr")
            io._tasks.append(asyncio.create_task(io._drain(io.stderr_path, stderr, io._stderr)))
        return io

    @property
    def stdout(self) -> bytes:
        """Captured stdout (when no sink was given)."""
        return bytes(self._stdout)

    @property
    def stderr(self) -> bytes:
        return bytes(self._stderr)

    async def _drain(
        self,
        path: str,
        sink: Callable[[bytes], Awaitable[None]] | None,
        buf: bytearray,
    ) -> None:
        fd = await asyncio.to_thread(os.open, path, os.O_RDONLY | os.O_CLOEXEC)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", buffering=0)
        )
        try:
            while chunk := await reader.read(1 << 16):
                if sink is not None:
                    await sink(chunk)
                else:
                    buf += chunk
        finally:
            transport.close()

    async def _feed(self, path: str, source: bytes | AsyncIterable[bytes]) -> None:
        # A blocking fd written from a thread: stdin is small and rare, and a FIFO writer
        # needs back-pressure more than it needs to save a thread hop per chunk.
        fd = await asyncio.to_thread(os.open, path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            if isinstance(source, bytes):
                await asyncio.to_thread(_write_all, fd, source)
            else:
                async for chunk in source:
                    await asyncio.to_thread(_write_all, fd, chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the process stopped reading; its exit status says the rest
        finally:
            os.close(fd)

    async def stdin_done(self) -> None:
        """Wait until all of stdin was written and its FIFO closed."""
        if self._stdin_task is not None:
            await self._stdin_task

    async def wait(self) -> None:
        """Wait for stdout/stderr to reach EOF (the daemon closed its ends)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self, grace: float = 2.0) -> None:
        """Finish copying (at most ``grace`` seconds), unblock stuck opens, remove the dir."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.wait()), grace)
        pending = [t for t in (*self._tasks, self._stdin_task) if t is not None and not t.done()]
        if pending:
            # Opens still blocked in threads complete once we open the other end ourselves.
            await asyncio.to_thread(self._unblock)
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        await asyncio.to_thread(shutil.rmtree, self.dir, True)

    def _unblock(self) -> None:
        for path, flags in (
            (self.stdout_path, os.O_WRONLY),
            (self.stderr_path, os.O_WRONLY),
            (self.stdin_path, os.O_RDONLY),
        ):
            if path:
                with contextlib.suppress(OSError):
                    os.close(os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC))


def _mkdtemp(root: Path) -> str:
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    return tempfile.mkdtemp(dir=root)


def _mkfifos(directory: Path, process_id: str, names: dict[str, bool]) -> None:
    for name, wanted in names.items():
        if wanted:
            os.mkfifo(directory / f"{process_id}-{name}", 0o700)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
