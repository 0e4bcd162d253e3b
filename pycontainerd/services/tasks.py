"""The tasks domain service: containerd's Tasks API over the task manager and shims.

The container record supplies the spec, runtime and snapshot; the rootfs comes from the
request's mounts or else from the container's snapshot. Everything about a running
process is answered by its shim; task events are published by the shims themselves.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from google.protobuf import any_pb2, empty_pb2

from pycontainerd import filters
from pycontainerd.api.runtime.task.v2 import shim_pb2
from pycontainerd.api.types import metrics_pb2
from pycontainerd.api.types.task import task_pb2
from pycontainerd.errdefs import InvalidArgument, NotFound, Unimplemented
from pycontainerd.grpc.convert import timestamp
from pycontainerd.metadata import containers
from pycontainerd.namespaces import namespace_required

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pycontainerd.api.types import mount_pb2
    from pycontainerd.metadata.db import MetadataDB
    from pycontainerd.snapshots.metadata import SnapshotService
    from pycontainerd.tasks.manager import Task, TaskManager


def _any(value: containers.AnyValue | None) -> any_pb2.Any | None:
    return None if value is None else any_pb2.Any(type_url=value.type_url, value=value.value)


def process_of(container_id: str, st: shim_pb2.StateResponse) -> task_pb2.Process:
    p = task_pb2.Process(
        container_id=container_id,
        id=st.exec_id or st.id,
        pid=st.pid,
        status=st.status,
        stdin=st.stdin,
        stdout=st.stdout,
        stderr=st.stderr,
        terminal=st.terminal,
        exit_status=st.exit_status,
    )
    if st.HasField("exited_at"):
        p.exited_at.CopyFrom(st.exited_at)
    return p


class TasksService:
    def __init__(
        self, manager: TaskManager, db: MetadataDB, snapshots: SnapshotService | None
    ) -> None:
        self.manager = manager
        self._db = db
        self._snapshots = snapshots

    async def container_exists(self, ns: str, id_: str) -> bool:
        return await self._db.view(lambda c: containers.find(c, ns, id_)) is not None

    def _task(self, id_: str) -> Task:
        ns = namespace_required()
        try:
            return self.manager.get(ns, id_)
        except NotFound:
            raise NotFound(f"task {id_}") from None

    async def create(
        self,
        container_id: str,
        rootfs: Sequence[mount_pb2.Mount],
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        options: any_pb2.Any | None,
        checkpoint: bool,
    ) -> int:
        ns = namespace_required()
        container = await self._db.view(lambda c: containers.get(c, ns, container_id))
        if checkpoint:
            raise Unimplemented("restore from checkpoint requires criu, which is not available")
        req = shim_pb2.CreateTaskRequest(
            rootfs=list(rootfs), terminal=terminal, stdin=stdin, stdout=stdout, stderr=stderr
        )
        if not rootfs and container.snapshot_key and self._snapshots is not None:
            mounts = await self._snapshots.get(container.snapshotter).mounts(container.snapshot_key)
            for m in mounts:
                req.rootfs.add(
                    type=m.type, source=m.source, target=m.target, options=list(m.options)
                )
        opts = (
            options if options is not None and options.type_url else _any(container.runtime.options)
        )
        if opts is not None:
            req.options.CopyFrom(opts)
        _task, pid = await self.manager.create(
            ns,
            container_id,
            spec=container.spec.value if container.spec is not None else b"",
            runtime=container.runtime.name,
            options=opts.SerializeToString() if opts is not None else b"",
            request=req,
        )
        return pid

    async def start(self, container_id: str, exec_id: str) -> int:
        t = self._task(container_id)
        resp = await t.shim.call(
            "Start", shim_pb2.StartRequest(id=container_id, exec_id=exec_id), shim_pb2.StartResponse
        )
        return resp.pid

    async def delete(self, container_id: str) -> shim_pb2.DeleteResponse:
        return await self.manager.delete(self._task(container_id))

    async def delete_process(self, container_id: str, exec_id: str) -> shim_pb2.DeleteResponse:
        t = self._task(container_id)
        return await t.shim.call(
            "Delete",
            shim_pb2.DeleteRequest(id=container_id, exec_id=exec_id),
            shim_pb2.DeleteResponse,
        )

    async def state(self, container_id: str, exec_id: str = "") -> task_pb2.Process:
        t = self._task(container_id)
        st = await t.shim.call(
            "State", shim_pb2.StateRequest(id=container_id, exec_id=exec_id), shim_pb2.StateResponse
        )
        return process_of(container_id, st)

    async def list_tasks(self) -> list[task_pb2.Process]:
        ns = namespace_required()

        async def one(t: Task) -> task_pb2.Process | None:
            try:
                st = await t.shim.call(
                    "State", shim_pb2.StateRequest(id=t.id), shim_pb2.StateResponse
                )
            except NotFound:
                return None
            return process_of(t.id, st)

        # Every shim is asked at once: a listing costs one round trip, not one per task.
        found = await asyncio.gather(*(one(t) for t in self.manager.in_namespace(ns)))
        return [p for p in found if p is not None]

    async def kill(self, container_id: str, exec_id: str, signal: int, all_: bool) -> None:
        t = self._task(container_id)
        await t.shim.call(
            "Kill",
            shim_pb2.KillRequest(id=container_id, exec_id=exec_id, signal=signal, all=all_),
            empty_pb2.Empty,
        )

    async def exec(
        self,
        container_id: str,
        exec_id: str,
        stdin: str,
        stdout: str,
        stderr: str,
        terminal: bool,
        spec: any_pb2.Any,
    ) -> None:
        if not exec_id:
            raise InvalidArgument("exec id must not be empty")
        t = self._task(container_id)
        req = shim_pb2.ExecProcessRequest(
            id=container_id,
            exec_id=exec_id,
            terminal=terminal,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            spec=spec,
        )
        await t.shim.call("Exec", req, empty_pb2.Empty)

    async def resize_pty(self, container_id: str, exec_id: str, width: int, height: int) -> None:
        t = self._task(container_id)
        await t.shim.call(
            "ResizePty",
            shim_pb2.ResizePtyRequest(id=container_id, exec_id=exec_id, width=width, height=height),
            empty_pb2.Empty,
        )

    async def close_io(self, container_id: str, exec_id: str, stdin: bool) -> None:
        t = self._task(container_id)
        await t.shim.call(
            "CloseIO",
            shim_pb2.CloseIORequest(id=container_id, exec_id=exec_id, stdin=stdin),
            empty_pb2.Empty,
        )

    async def pause(self, container_id: str) -> None:
        t = self._task(container_id)
        await t.shim.call("Pause", shim_pb2.PauseRequest(id=container_id), empty_pb2.Empty)

    async def resume(self, container_id: str) -> None:
        t = self._task(container_id)
        await t.shim.call("Resume", shim_pb2.ResumeRequest(id=container_id), empty_pb2.Empty)

    async def pids(self, container_id: str) -> list[task_pb2.ProcessInfo]:
        t = self._task(container_id)
        resp = await t.shim.call(
            "Pids", shim_pb2.PidsRequest(id=container_id), shim_pb2.PidsResponse
        )
        return list(resp.processes)

    async def update(
        self, container_id: str, resources: any_pb2.Any, annotations: dict[str, str]
    ) -> None:
        t = self._task(container_id)
        req = shim_pb2.UpdateTaskRequest(
            id=container_id, resources=resources, annotations=annotations
        )
        await t.shim.call("Update", req, empty_pb2.Empty)

    async def wait(self, container_id: str, exec_id: str) -> shim_pb2.WaitResponse:
        t = self._task(container_id)
        return await t.shim.call(
            "Wait", shim_pb2.WaitRequest(id=container_id, exec_id=exec_id), shim_pb2.WaitResponse
        )

    async def metrics(self, filter_strings: Sequence[str]) -> list[metrics_pb2.Metric]:
        ns = namespace_required()
        flt = filters.parse(list(filter_strings))

        async def one(t: Task) -> metrics_pb2.Metric | None:
            try:
                resp = await t.shim.call(
                    "Stats", shim_pb2.StatsRequest(id=t.id), shim_pb2.StatsResponse
                )
            except NotFound:
                return None
            return metrics_pb2.Metric(timestamp=timestamp(time.time_ns()), id=t.id, data=resp.stats)

        chosen = [
            t
            for t in self.manager.in_namespace(ns)
            if flt.match(filters.field_adaptor({"id": t.id, "runtime": t.runtime}))
        ]
        found = await asyncio.gather(*(one(t) for t in chosen))
        return [m for m in found if m is not None]
