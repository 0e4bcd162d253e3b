"""Stopping and removing containers, shared by ``run --rm``, ``stop``, ``rm`` and ``prune``.

A stopped container keeps no task: once its process has exited, pcd records the exit code
and time in the container's labels and deletes the task (which ends its shim), so an
exited container costs no process. A detached container that exits on its own keeps its
stopped task until the next ``stop``/``rm``; ``ps`` reads either.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from pycontainerd.cli import net
from pycontainerd.cli.state import (
    LABEL_EXIT_CODE,
    LABEL_FINISHED,
    LABEL_LOG_DIR,
    LABEL_NAME,
    short_id,
    task_of,
    update_labels,
)
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument, NotFound, PycdError

if TYPE_CHECKING:
    from pycontainerd.cli.state import Settings
    from pycontainerd.client import Client, Container, ExitStatus, Task

__all__ = ["RUNNING", "display_name", "parse_signal", "record_exit", "remove", "stop"]

RUNNING = ("running", "paused", "pausing")
STOP_SIGNAL_LABEL = "io.containerd.image.config.stop-signal"


def display_name(container: Container) -> str:
    return container.labels.get(LABEL_NAME) or short_id(container.id)


def parse_signal(text: str) -> int:
    """``9``, ``KILL`` or ``SIGKILL`` → 9."""
    if text.isdigit():
        return int(text)
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise InvalidArgument(f"unknown signal {text!r}") from None


async def record_exit(client: Client, container: Container, status: ExitStatus) -> None:
    when = status.exited_at or datetime.now(UTC)
    with contextlib.suppress(NotFound):
        await update_labels(
            client,
            container,
            {LABEL_EXIT_CODE: str(status.code), LABEL_FINISHED: when.isoformat()},
        )


async def _finish(client: Client, container: Container, task: Task) -> None:
    """Record a stopped task's exit and delete it."""
    status = await task.wait()
    await record_exit(client, container, status)
    with contextlib.suppress(NotFound):
        await task.delete()


async def stop(client: Client, container: Container, grace: float) -> None:
    """The stop signal (image's, else SIGTERM), SIGKILL after ``grace`` s, then clean up."""
    task = await task_of(container)
    if task is None:
        return
    if await task.status() in RUNNING:
        sig = parse_signal(container.labels.get(STOP_SIGNAL_LABEL) or "SIGTERM")
        waiter = asyncio.ensure_future(task.wait())
        try:
            with contextlib.suppress(NotFound):
                await task.kill(sig)
            try:
                await asyncio.wait_for(asyncio.shield(waiter), grace)
            except TimeoutError:
                with contextlib.suppress(NotFound):
                    await task.kill(signal.SIGKILL, all=True)
                await waiter
        finally:
            waiter.cancel()
    await _finish(client, container, task)


async def remove(settings: Settings, client: Client, container: Container, *, force: bool) -> None:
    """Delete the task (``force``: even a running one), the network, the record, the logs."""
    task = await task_of(container)
    if task is not None:
        state = await task.status()
        if state in RUNNING and not force:
            raise FailedPrecondition(
                f"container {display_name(container)} is {state}: stop it first or use rm -f"
            )
        with contextlib.suppress(NotFound):
            await task.delete(force=True)
    await net.detach(settings, container.id, container.labels)
    with contextlib.suppress(NotFound):
        await container.delete()
    log_dir = container.labels.get(LABEL_LOG_DIR)
    if log_dir:
        await asyncio.to_thread(shutil.rmtree, Path(log_dir), True)


async def remove_quietly(settings: Settings, client: Client, container: Container) -> None:
    """Undo a half-made ``run``; an error here must not hide the one that caused it."""
    with contextlib.suppress(PycdError, OSError):
        await remove(settings, client, container, force=True)
