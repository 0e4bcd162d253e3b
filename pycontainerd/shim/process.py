"""Processes of a container — the init process and execs — and their state machines.

States follow containerd's ``pkg/process``: init is CREATED → RUNNING ⇄ PAUSED → STOPPED
(then deleted), an exec CREATED → RUNNING → STOPPED. An exit is recorded once: its output
is drained into the client's FIFOs first (bounded), then every ``wait()`` returns and the
container's ``on_exit`` callback publishes ``/tasks/exit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pycontainerd.errdefs import FailedPrecondition, NotFound, PycdError
from pycontainerd.runtime.runc import Runc, is_not_exist, is_not_running
from pycontainerd.shim.reaper import kill_quietly
from pycontainerd.shim.stdio import ProcessIO, StdioPaths

__all__ = ["ExecProcess", "InitProcess", "Process", "State"]

log = logging.getLogger(__name__)

# How long an exit waits for the process's output to reach the FIFOs: a background child
# can hold the pipe forever, and the exit must still be reported.
DRAIN_TIMEOUT_S = 2.0


class State(enum.IntEnum):
    """Values of ``containerd.v1.types.Status``."""

    UNKNOWN = 0
    CREATED = 1
    RUNNING = 2
    STOPPED = 3
    PAUSED = 4
    PAUSING = 5


@dataclass(eq=False)
class Process:
    """What init and exec processes share: pid, stdio, exit and waiters."""

    id: str
    container_id: str
    paths: StdioPaths
    state: State = State.CREATED
    pid: int = 0
    io: ProcessIO | None = None
    exit_status: int = 0
    exited_at_ns: int = 0
    on_exit: Callable[[Process], None] | None = None
    # Held while Start runs and reports: an exit is reported only after its start event.
    gate: asyncio.Lock | None = None
    _exited: asyncio.Event = field(default_factory=asyncio.Event)
    _watch: asyncio.Task[None] | None = None

    @property
    def exited(self) -> bool:
        return self._exited.is_set()

    async def wait(self) -> None:
        await self._exited.wait()

    def watch(self, exit_future: asyncio.Future[int]) -> None:
        """Record the exit when ``exit_future`` (from the reaper) resolves."""
        self._watch = asyncio.get_running_loop().create_task(self._on_exit(exit_future))

    async def _before_exit(self) -> None:
        """Hook run between the reaped exit and its report."""

    async def _on_exit(self, exit_future: asyncio.Future[int]) -> None:
        status = await exit_future
        await self._before_exit()
        if self.io is not None:
            await self.io.drain(DRAIN_TIMEOUT_S)
        if self.gate is not None:
            async with self.gate:
                pass
        self.set_exited(status)

    def set_exited(self, status: int) -> None:
        if self._exited.is_set():
            return
        self.exit_status = status
        self.exited_at_ns = time.time_ns()
        self.state = State.STOPPED
        self._exited.set()
        if self.on_exit is not None:
            self.on_exit(self)

    async def kill(self, sig: int, all: bool = False) -> None:
        raise NotImplementedError

    def resize(self, width: int, height: int) -> None:
        if self.io is None:
            raise NotFound(f"process {self.id}: no stdio")
        self.io.resize(width, height)

    def close_stdin(self) -> None:
        if self.io is not None:
            self.io.close_stdin()

    def close_io(self) -> None:
        if self.io is not None:
            self.io.close()


@dataclass(eq=False)
class InitProcess(Process):
    """The container's first process; signals go through runc."""

    runc: Runc | None = None
    kill_all_on_exit: bool = False

    async def _before_exit(self) -> None:
        # Without a pid namespace of its own, the container's other processes outlive
        # init: kill them, as containerd does, before the exit is reported.
        if self.kill_all_on_exit and self.runc is not None:
            try:
                await self.runc.kill(self.container_id, signal.SIGKILL, all=True)
            except PycdError as exc:
                log.debug("kill --all after init exit: %s", exc)

    async def kill(self, sig: int, all: bool = False) -> None:
        if self.exited:
            raise NotFound("process already finished")
        assert self.runc is not None
        try:
            await self.runc.kill(self.container_id, sig, all=all)
        except PycdError as exc:
            if is_not_running(exc) or is_not_exist(exc):
                raise NotFound("process already finished") from exc
            raise


@dataclass(eq=False)
class ExecProcess(Process):
    """An additional process; ``spec`` is the OCI process JSON from the Exec request."""

    spec: bytes = b""

    async def kill(self, sig: int, all: bool = False) -> None:
        if self.state == State.CREATED:
            raise FailedPrecondition(f"exec {self.id} is not started")
        if self.exited or not kill_quietly(self.pid, sig):
            raise NotFound("process already finished")


def signal_name(sig: int) -> str:
    with contextlib.suppress(ValueError):
        return signal.Signals(sig).name
    return str(sig)
