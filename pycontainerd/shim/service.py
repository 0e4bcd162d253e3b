"""``containerd.task.v2.Task`` over ttrpc: the shim API, as containerd-shim-runc-v2 serves it.

One service may hold several containers (containerd groups a pod's containers in one
shim). Errors are domain errors (``pycontainerd.errdefs``); ttrpc maps them to status codes.
Events (``/tasks/*``) go through the :class:`~pycontainerd.shim.publisher.Publisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2, timestamp_pb2

from pycontainerd import typeurl
from pycontainerd.api.events import task_pb2 as ev
from pycontainerd.api.runtime.runc.options import oci_pb2
from pycontainerd.api.runtime.task.v2 import shim_pb2 as api
from pycontainerd.api.types.task import task_pb2
from pycontainerd.errdefs import AlreadyExists, NotFound, PycdError, Unimplemented
from pycontainerd.events import topics
from pycontainerd.shim import metrics
from pycontainerd.shim.container import Container
from pycontainerd.shim.process import ExecProcess, Process, State
from pycontainerd.ttrpc import Method, Server

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from google.protobuf.message import Message

    from pycontainerd.shim.publisher import Publisher
    from pycontainerd.shim.reaper import Reaper

__all__ = ["SERVICE", "TaskService"]

log = logging.getLogger(__name__)

SERVICE = "containerd.task.v2.Task"
_EMPTY = empty_pb2.Empty()


def _ts(ns: int) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    if ns:
        ts.FromNanoseconds(ns)
    return ts


class TaskService:
    """The Task API over the containers of this shim."""

    def __init__(
        self,
        *,
        namespace: str,
        runc_root: str,
        reaper: Reaper,
        publisher: Publisher,
        on_shutdown: Callable[[], None],
    ) -> None:
        self.namespace = namespace
        self.runc_root = runc_root
        self.reaper = reaper
        self.publisher = publisher
        self.on_shutdown = on_shutdown
        self.containers: dict[str, Container] = {}
        self._creating: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()

    def register(self, server: Server) -> None:
        methods: dict[str, Method] = {}
        for name, req_type in (
            ("State", api.StateRequest),
            ("Create", api.CreateTaskRequest),
            ("Start", api.StartRequest),
            ("Delete", api.DeleteRequest),
            ("Pids", api.PidsRequest),
            ("Pause", api.PauseRequest),
            ("Resume", api.ResumeRequest),
            ("Checkpoint", api.CheckpointTaskRequest),
            ("Kill", api.KillRequest),
            ("Exec", api.ExecProcessRequest),
            ("ResizePty", api.ResizePtyRequest),
            ("CloseIO", api.CloseIORequest),
            ("Update", api.UpdateTaskRequest),
            ("Wait", api.WaitRequest),
            ("Stats", api.StatsRequest),
            ("Connect", api.ConnectRequest),
            ("Shutdown", api.ShutdownRequest),
        ):
            methods[name] = Method(req_type, getattr(self, name))
        server.register(SERVICE, methods)

    def _publish(self, topic: str, event: Message) -> None:
        self.publisher.publish(topic, event)

    def _container(self, id: str) -> Container:
        c = self.containers.get(id)
        if c is None:
            raise NotFound("container not created")
        return c

    def _on_exit(self, p: Process) -> None:
        self._publish(
            topics.TASK_EXIT,
            ev.TaskExit(
                container_id=p.container_id,
                id=p.id,
                pid=p.pid,
                exit_status=p.exit_status,
                exited_at=_ts(p.exited_at_ns),
            ),
        )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def Create(
        self, req: api.CreateTaskRequest, md: Mapping[str, str]
    ) -> api.CreateTaskResponse:
        if req.id in self.containers or req.id in self._creating:
            raise AlreadyExists(f"task {req.id}")
        self._creating.add(req.id)
        try:
            c = await Container.create(
                req,
                namespace=self.namespace,
                runc_root=self.runc_root,
                reaper=self.reaper,
                on_exit=self._on_exit,
            )
        finally:
            self._creating.discard(req.id)
        self.containers[req.id] = c
        # Armed now, before Start: a container that OOMs at once must not be missed.
        self._spawn(self._watch_oom(c))
        self._publish(
            topics.TASK_CREATE,
            ev.TaskCreate(
                container_id=req.id,
                bundle=req.bundle,
                rootfs=req.rootfs,
                io=ev.TaskIO(
                    stdin=req.stdin, stdout=req.stdout, stderr=req.stderr, terminal=req.terminal
                ),
                checkpoint=req.checkpoint,
                pid=c.init.pid,
            ),
        )
        return api.CreateTaskResponse(pid=c.init.pid)

    async def Start(self, req: api.StartRequest, md: Mapping[str, str]) -> api.StartResponse:
        c = self._container(req.id)
        async with c.gate:
            if not req.exec_id:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(c.oom_armed.wait(), 2.0)
                pid = await c.start()
                self._publish(topics.TASK_START, ev.TaskStart(container_id=c.id, pid=pid))
            else:
                p = c.process(req.exec_id)
                assert isinstance(p, ExecProcess)
                pid = await c.start_exec(p, self.reaper)
                self._publish(
                    topics.TASK_EXEC_STARTED,
                    ev.TaskExecStarted(container_id=c.id, exec_id=p.id, pid=pid),
                )
        return api.StartResponse(pid=pid)

    async def _watch_oom(self, c: Container) -> None:
        try:
            await self._oom_loop(c)
        finally:
            c.oom_armed.set()

    async def _oom_loop(self, c: Container) -> None:
        if metrics.cgroup_v2():
            return  # TODO: memory.events through inotify on cgroup v2 hosts
        pid = c.init.pid

        def on_oom() -> None:
            self._publish(topics.TASK_OOM, ev.TaskOOM(container_id=c.id))

        def arm() -> metrics.OOMWatcher | None:
            path = metrics.memory_cgroup(pid)
            if path is None:
                return None
            w = metrics.OOMWatcher(path, on_oom)
            w.register()
            return w

        try:
            watcher = await asyncio.to_thread(arm)
        except OSError as exc:
            log.warning("container %s: no OOM notifications: %s", c.id, exc)
            return
        if watcher is None:
            return
        watcher.start()
        c.oom_armed.set()
        try:
            await c.init.wait()
        finally:
            watcher.close()

    async def Delete(self, req: api.DeleteRequest, md: Mapping[str, str]) -> api.DeleteResponse:
        c = self._container(req.id)
        if req.exec_id:
            p: Process = c.delete_exec(req.exec_id)
        else:
            p = await c.delete_init(self.reaper)
            self.containers.pop(req.id, None)
            self._publish(
                topics.TASK_DELETE,
                ev.TaskDelete(
                    container_id=c.id,
                    pid=p.pid,
                    exit_status=p.exit_status,
                    exited_at=_ts(p.exited_at_ns),
                ),
            )
        return api.DeleteResponse(
            pid=p.pid, exit_status=p.exit_status, exited_at=_ts(p.exited_at_ns)
        )

    async def State(self, req: api.StateRequest, md: Mapping[str, str]) -> api.StateResponse:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        return api.StateResponse(
            id=p.id,
            bundle=c.bundle,
            pid=p.pid,
            status=int(p.state),  # type: ignore[arg-type]
            stdin=p.paths.stdin,
            stdout=p.paths.stdout,
            stderr=p.paths.stderr,
            terminal=p.paths.terminal,
            exit_status=p.exit_status,
            exited_at=_ts(p.exited_at_ns),
            exec_id=req.exec_id,
        )

    async def Pids(self, req: api.PidsRequest, md: Mapping[str, str]) -> api.PidsResponse:
        c = self._container(req.id)
        by_pid = {p.pid: p.id for p in c.execs.values() if p.pid}
        out = api.PidsResponse()
        for pid in await c.pids():
            info = task_pb2.ProcessInfo(pid=pid)
            if pid in by_pid:
                info.info.CopyFrom(typeurl.pack(oci_pb2.ProcessDetails(exec_id=by_pid[pid])))
            out.processes.append(info)
        return out

    async def Pause(self, req: api.PauseRequest, md: Mapping[str, str]) -> empty_pb2.Empty:
        c = self._container(req.id)
        await c.pause()
        self._publish(topics.TASK_PAUSED, ev.TaskPaused(container_id=c.id))
        return _EMPTY

    async def Resume(self, req: api.ResumeRequest, md: Mapping[str, str]) -> empty_pb2.Empty:
        c = self._container(req.id)
        await c.resume()
        self._publish(topics.TASK_RESUMED, ev.TaskResumed(container_id=c.id))
        return _EMPTY

    async def Checkpoint(
        self, req: api.CheckpointTaskRequest, md: Mapping[str, str]
    ) -> empty_pb2.Empty:
        c = self._container(req.id)
        opts = oci_pb2.CheckpointOptions()
        if req.HasField("options") and req.options.type_url.endswith("CheckpointOptions"):
            opts.ParseFromString(req.options.value)
        if not shutil.which(c.runc.criu or "criu"):
            raise Unimplemented("checkpoint requires criu")
        image = opts.image_path or req.path
        await c.runc.checkpoint(
            c.id,
            image,
            work_path=opts.work_path,
            leave_running=not opts.exit,
            tcp_established=opts.open_tcp,
            ext_unix_sk=opts.external_unix_sockets,
            shell_job=opts.terminal,
            file_locks=opts.file_locks,
            empty_ns=list(opts.empty_namespaces),
            cgroups_mode=opts.cgroups_mode,
        )
        return _EMPTY

    async def Kill(self, req: api.KillRequest, md: Mapping[str, str]) -> empty_pb2.Empty:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        await p.kill(req.signal, req.all)
        return _EMPTY

    async def Exec(self, req: api.ExecProcessRequest, md: Mapping[str, str]) -> empty_pb2.Empty:
        c = self._container(req.id)
        p = c.add_exec(req, self._on_exit)
        self._publish(topics.TASK_EXEC_ADDED, ev.TaskExecAdded(container_id=c.id, exec_id=p.id))
        return _EMPTY

    async def ResizePty(self, req: api.ResizePtyRequest, md: Mapping[str, str]) -> empty_pb2.Empty:
        c = self._container(req.id)
        c.process(req.exec_id).resize(req.width, req.height)
        return _EMPTY

    async def CloseIO(self, req: api.CloseIORequest, md: Mapping[str, str]) -> empty_pb2.Empty:
        c = self._container(req.id)
        if req.stdin:
            c.process(req.exec_id).close_stdin()
        return _EMPTY

    async def Update(self, req: api.UpdateTaskRequest, md: Mapping[str, str]) -> empty_pb2.Empty:
        c = self._container(req.id)
        if c.init.exited:
            raise PycdError("cannot update a stopped task")
        await c.runc.update(c.id, req.resources.value)
        return _EMPTY

    async def Wait(self, req: api.WaitRequest, md: Mapping[str, str]) -> api.WaitResponse:
        c = self._container(req.id)
        p = c.process(req.exec_id)
        await p.wait()
        return api.WaitResponse(exit_status=p.exit_status, exited_at=_ts(p.exited_at_ns))

    async def Stats(self, req: api.StatsRequest, md: Mapping[str, str]) -> api.StatsResponse:
        c = self._container(req.id)
        if c.init.state == State.STOPPED:
            raise NotFound("cgroup does not exist")
        stats = await c.runc.stats(c.id)
        return api.StatsResponse(stats=typeurl.pack(metrics.to_metrics(stats)))

    async def Connect(self, req: api.ConnectRequest, md: Mapping[str, str]) -> api.ConnectResponse:
        c = self.containers.get(req.id)
        return api.ConnectResponse(shim_pid=os.getpid(), task_pid=c.init.pid if c else 0)

    async def Shutdown(self, req: api.ShutdownRequest, md: Mapping[str, str]) -> empty_pb2.Empty:
        if self.containers or self._creating:
            return _EMPTY
        # Answer first; the server stops on the next turns of the loop.
        asyncio.get_running_loop().call_later(0.01, self.on_shutdown)
        return _EMPTY

    async def close(self) -> None:
        for t in list(self._background):
            t.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*self._background, return_exceptions=True)
