"""Attaching the user's terminal or pipes to a container process (``run``, ``exec``).

``attach`` runs one process to its end: ``TaskIO`` FIFOs whose output goes to our
stdout/stderr (and, for ``run``, to the log file too), stdin streamed in with ``-i``
(``CloseIO`` at its EOF so the process sees EOF as well), a raw local terminal and
window-size forwarding with ``-t``, and SIGINT/SIGTERM/SIGHUP forwarded to the process
when there is no terminal to carry ^C. stdin is read through a fresh open of
``/proc/self/fd/0``: making that non-blocking leaves the shell's own file description
(often shared with our stdout) untouched.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import sys
import termios
import tty
from typing import TYPE_CHECKING

from pycontainerd.client import TaskIO
from pycontainerd.errdefs import PycdError

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

    from pycontainerd.cli.logs import LogWriter
    from pycontainerd.client import ExitStatus, Process

__all__ = ["attach", "make_io", "raw_terminal", "stdin_chunks", "terminal_size"]

OUTPUT_GRACE = 5.0


def terminal_size() -> tuple[int, int] | None:
    """(columns, rows) of our terminal, if any of stdin/stdout is one."""
    for fd in (1, 0, 2):
        try:
            rows, cols, _, _ = struct.unpack("HHHH", fcntl.ioctl(fd, termios.TIOCGWINSZ, b"\0" * 8))
        except OSError:
            continue
        if rows and cols:
            return cols, rows
    return None


@contextlib.contextmanager
def raw_terminal(enabled: bool) -> Iterator[None]:
    """Put stdin's terminal in raw mode for the block (the container's pty does echo)."""
    if not enabled or not os.isatty(0):
        yield
        return
    saved = termios.tcgetattr(0)
    tty.setraw(0)
    try:
        yield
    finally:
        termios.tcsetattr(0, termios.TCSADRAIN, saved)


async def _readable(fd: int) -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not fut.done():
            fut.set_result(None)

    loop.add_reader(fd, wake)
    try:
        await fut
    finally:
        loop.remove_reader(fd)


async def stdin_chunks() -> AsyncIterator[bytes]:
    """Our stdin as chunks until EOF, without blocking the loop."""
    fd = await asyncio.to_thread(os.open, "/proc/self/fd/0", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.set_blocking(fd, False)
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await _readable(fd)
                continue
            except OSError:
                return  # EIO: the terminal went away
            if not data:
                return
            yield data
    finally:
        os.close(fd)


def _stdout_sink(stream: str, log: LogWriter | None) -> Callable[[bytes], Awaitable[None]]:
    out = sys.stdout.buffer if stream == "stdout" else sys.stderr.buffer

    async def sink(data: bytes) -> None:
        out.write(data)
        out.flush()
        if log is not None:
            await asyncio.to_thread(log.write, stream, data)

    return sink


async def make_io(
    process_id: str, *, interactive: bool, terminal: bool, log: LogWriter | None = None
) -> TaskIO:
    return await TaskIO.create(
        process_id,
        stdin=stdin_chunks() if interactive else None,
        stdout=_stdout_sink("stdout", log),
        stderr=None if terminal else _stdout_sink("stderr", log),
        capture=False,
        terminal=terminal,
    )


async def attach(process: Process, *, interactive: bool, terminal: bool) -> ExitStatus:
    """Start ``process`` (created with ``make_io``'s io) and wait for its exit."""
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(process.wait())
    helpers: list[asyncio.Task[None]] = []
    handled: list[int] = []
    try:
        if not terminal:
            # Installed before the start, so no signal can arrive between the process
            # starting and us being ready to pass it on.
            def on_signal(sig: int) -> None:
                helpers.append(asyncio.create_task(_forward(process, sig)))

            for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                loop.add_signal_handler(signum, on_signal, int(signum))
                handled.append(int(signum))
        with raw_terminal(terminal and interactive):

            async def resize() -> None:
                size = terminal_size()
                if size is not None:
                    with contextlib.suppress(PycdError):
                        await process.resize(*size)

            if terminal:
                # An init task's pty exists from Create on: size it before the process
                # runs, so its first look at the window is right. An exec's comes at Start.
                await resize()
            await process.start()
            if terminal:

                def on_winch() -> None:
                    helpers.append(asyncio.create_task(resize()))

                on_winch()
                loop.add_signal_handler(signal.SIGWINCH, on_winch)
                handled.append(signal.SIGWINCH)
            if interactive and not terminal:
                helpers.append(asyncio.create_task(_close_stdin_at_eof(process)))
            status = await waiter
        if process.io is not None:
            # Output still in the FIFOs arrives after the exit; a background child that
            # keeps them open must not keep us waiting forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.io.wait(), OUTPUT_GRACE)
        return status
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        for h in helpers:
            h.cancel()
        await asyncio.gather(*helpers, return_exceptions=True)
        if not waiter.done():
            waiter.cancel()


async def _close_stdin_at_eof(process: Process) -> None:
    with contextlib.suppress(PycdError):
        await process.close_stdin()


async def _forward(process: Process, sig: int) -> None:
    with contextlib.suppress(PycdError):
        await process.kill(sig)
