"""Tasks and processes: start, wait, kill, exec, resize, pids, metrics, delete.

A ``Process`` is the init task or an exec of it, addressed by container ID and exec
ID (empty for init). ``wait()`` is the ``Tasks.Wait`` RPC: callers that must not miss a
fast exit start it before ``start()`` (``waiter = asyncio.ensure_future(p.wait())``),
as ctr does. ``delete()`` refuses a running process client-side (as containerd's
client does), waits for the stdio copiers, then deletes and removes the FIFOs.
"""

from __future__ import annotations

import contextlib
import json
import signal as _signal
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2
from google.protobuf.message import Message

from pycontainerd import typeurl
from pycontainerd.api.cgroups.v1 import metrics_pb2 as _cgroups_v1  # noqa: F401 - registers types
from pycontainerd.api.cgroups.v2 import metrics_pb2 as _cgroups_v2  # noqa: F401 - registers types
from pycontainerd.api.services.tasks.v1 import tasks_pb2
from pycontainerd.api.types.task import task_pb2
from pycontainerd.client._client import timestamp_to_datetime
from pycontainerd.client.spec import PROCESS_TYPE_URL
from pycontainerd.errdefs import FailedPrecondition, NotFound, PycdError

if TYPE_CHECKING:
    from pycontainerd.client._client import RawClient
    from pycontainerd.client.cio import TaskIO

__all__ = ["ExitStatus", "Metric", "Process", "Task"]

_STATUS_NAMES = {
    task_pb2.UNKNOWN: "unknown",
    task_pb2.CREATED: "created",
    task_pb2.RUNNING: "running",
    task_pb2.STOPPED: "stopped",
    task_pb2.PAUSED: "paused",
    task_pb2.PAUSING: "pausing",
}


@dataclass(frozen=True, slots=True)
class ExitStatus:
    code: int
    exited_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Metric:
    id: str
    timestamp: datetime
    data: Message | any_pb2.Any


class Process:
    """One process of a task (``exec_id == ""`` is the init process)."""

    def __init__(
        self, client: RawClient, container_id: str, exec_id: str, pid: int, io: TaskIO | None
    ) -> None:
        self._c = client
        self.container_id = container_id
        self.exec_id = exec_id
        self.pid = pid
        self.io = io

    @property
    def id(self) -> str:
        return self.exec_id or self.container_id

    async def start(self) -> int:
        resp = await self._c.call(
            self._c.tasks_stub.Start,
            tasks_pb2.StartRequest(container_id=self.container_id, exec_id=self.exec_id),
        )
        self.pid = resp.pid
        return self.pid

    async def wait(self) -> ExitStatus:
        """Block until the process exits (also valid before ``start``)."""
        resp = await self._c.call(
            self._c.tasks_stub.Wait,
            tasks_pb2.WaitRequest(container_id=self.container_id, exec_id=self.exec_id),
        )
        return ExitStatus(resp.exit_status, timestamp_to_datetime(resp.exited_at))

    async def kill(self, sig: int = _signal.SIGTERM, *, all: bool = False) -> None:
        await self._c.call(
            self._c.tasks_stub.Kill,
            tasks_pb2.KillRequest(
                container_id=self.container_id, exec_id=self.exec_id, signal=int(sig), all=all
            ),
        )

    async def resize(self, width: int, height: int) -> None:
        await self._c.call(
            self._c.tasks_stub.ResizePty,
            tasks_pb2.ResizePtyRequest(
                container_id=self.container_id, exec_id=self.exec_id, width=width, height=height
            ),
        )

    async def close_stdin(self) -> None:
        """Deliver EOF: finish writing the stdin source, then ``Tasks.CloseIO``."""
        if self.io is not None:
            await self.io.stdin_done()
        await self._c.call(
            self._c.tasks_stub.CloseIO,
            tasks_pb2.CloseIORequest(
                container_id=self.container_id, exec_id=self.exec_id, stdin=True
            ),
        )

    async def status(self) -> str:
        """``created``, ``running``, ``stopped``, ``paused``, ``pausing`` or ``unknown``."""
        resp = await self._c.call(
            self._c.tasks_stub.Get,
            tasks_pb2.GetRequest(container_id=self.container_id, exec_id=self.exec_id),
        )
        return _STATUS_NAMES.get(resp.process.status, "unknown")

    async def delete(self, *, force: bool = False) -> ExitStatus:
        """Delete a stopped process (``force``: SIGKILL and wait first)."""
        state = await self.status()
        if state in ("running", "paused", "pausing") or (state == "created" and self.exec_id):
            if not force:
                raise FailedPrecondition(
                    f"process {self.id} must be stopped before deletion: {state}"
                )
            with contextlib.suppress(NotFound):
                await self.kill(_signal.SIGKILL)
            await self.wait()
        if self.io is not None:
            await self.io.close()
        if self.exec_id:
            resp: Any = await self._c.call(
                self._c.tasks_stub.DeleteProcess,
                tasks_pb2.DeleteProcessRequest(
                    container_id=self.container_id, exec_id=self.exec_id
                ),
            )
        else:
            resp = await self._c.call(
                self._c.tasks_stub.Delete,
                tasks_pb2.DeleteTaskRequest(container_id=self.container_id),
            )
        return ExitStatus(resp.exit_status, timestamp_to_datetime(resp.exited_at))


class Task(Process):
    """A container's init process plus the task-wide operations."""

    def __init__(
        self,
        client: RawClient,
        container_id: str,
        pid: int,
        io: TaskIO | None,
        spec: dict[str, Any],
    ) -> None:
        super().__init__(client, container_id, "", pid, io)
        self._spec = spec

    async def pause(self) -> None:
        await self._c.call(
            self._c.tasks_stub.Pause, tasks_pb2.PauseTaskRequest(container_id=self.container_id)
        )

    async def resume(self) -> None:
        await self._c.call(
            self._c.tasks_stub.Resume,
            tasks_pb2.ResumeTaskRequest(container_id=self.container_id),
        )

    async def pids(self) -> list[int]:
        resp = await self._c.call(
            self._c.tasks_stub.ListPids,
            tasks_pb2.ListPidsRequest(container_id=self.container_id),
        )
        return [p.pid for p in resp.processes]

    async def metrics(self) -> Metric:
        """The task's cgroup statistics (``io.containerd.cgroups.v1/v2.Metrics``)."""
        resp = await self._c.call(
            self._c.tasks_stub.Metrics,
            tasks_pb2.MetricsRequest(filters=[f"id=={self.container_id}"]),
        )
        for m in resp.metrics:
            if m.id == self.container_id:
                data: Message | any_pb2.Any
                try:
                    data = typeurl.unpack(m.data)
                except PycdError:
                    data = m.data
                return Metric(m.id, timestamp_to_datetime(m.timestamp), data)
        raise NotFound(f"no metrics for task {self.container_id}")

    async def exec(
        self,
        exec_id: str,
        args: list[str],
        *,
        io: TaskIO | None = None,
        env: list[str] | None = None,
        cwd: str | None = None,
        tty: bool = False,
    ) -> Process:
        """Add a process to the running task (not started yet: call ``start()``)."""
        process = json.loads(json.dumps(self._spec["process"]))  # deep copy
        process["args"] = list(args)
        process["terminal"] = tty
        if env:
            process["env"] = [*process.get("env", []), *env]
        if cwd:
            process["cwd"] = cwd
        spec = any_pb2.Any(type_url=PROCESS_TYPE_URL, value=json.dumps(process).encode())
        req = tasks_pb2.ExecProcessRequest(
            container_id=self.container_id,
            exec_id=exec_id,
            spec=spec,
            terminal=tty,
            stdin=io.stdin_path if io else "",
            stdout=io.stdout_path if io else "",
            stderr=io.stderr_path if io else "",
        )
        try:
            await self._c.call(self._c.tasks_stub.Exec, req)
        except BaseException:
            if io is not None:
                await io.close(grace=0)
            raise
        return Process(self._c, self.container_id, exec_id, 0, io)
