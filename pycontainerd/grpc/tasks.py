"""containerd.services.tasks.v1.Tasks over the tasks domain service."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2

from pycontainerd.api.services.tasks.v1 import tasks_pb2 as pb
from pycontainerd.api.services.tasks.v1 import tasks_pb2_grpc
from pycontainerd.errdefs import Unimplemented

if TYPE_CHECKING:
    import grpc.aio

    from pycontainerd.api.runtime.task.v2 import shim_pb2
    from pycontainerd.services.tasks import TasksService

    Ctx = grpc.aio.ServicerContext[Any, Any]


def _deleted(
    container_id: str, resp: shim_pb2.DeleteResponse, exec_id: str = ""
) -> pb.DeleteResponse:
    out = pb.DeleteResponse(id=exec_id, pid=resp.pid, exit_status=resp.exit_status)
    if resp.HasField("exited_at"):
        out.exited_at.CopyFrom(resp.exited_at)
    return out


class TasksServicer(tasks_pb2_grpc.TasksServicer):
    def __init__(self, service: TasksService) -> None:
        self._svc = service

    def register(self, server: grpc.aio.Server) -> None:
        tasks_pb2_grpc.add_TasksServicer_to_server(self, server)

    async def Create(self, request: pb.CreateTaskRequest, context: Ctx) -> pb.CreateTaskResponse:
        pid = await self._svc.create(
            request.container_id,
            request.rootfs,
            request.stdin,
            request.stdout,
            request.stderr,
            request.terminal,
            request.options if request.HasField("options") else None,
            request.HasField("checkpoint") and bool(request.checkpoint.digest),
        )
        return pb.CreateTaskResponse(container_id=request.container_id, pid=pid)

    async def Start(self, request: pb.StartRequest, context: Ctx) -> pb.StartResponse:
        return pb.StartResponse(pid=await self._svc.start(request.container_id, request.exec_id))

    async def Delete(self, request: pb.DeleteTaskRequest, context: Ctx) -> pb.DeleteResponse:
        return _deleted(request.container_id, await self._svc.delete(request.container_id))

    async def DeleteProcess(
        self, request: pb.DeleteProcessRequest, context: Ctx
    ) -> pb.DeleteResponse:
        resp = await self._svc.delete_process(request.container_id, request.exec_id)
        return _deleted(request.container_id, resp, request.exec_id)

    async def Get(self, request: pb.GetRequest, context: Ctx) -> pb.GetResponse:
        return pb.GetResponse(process=await self._svc.state(request.container_id, request.exec_id))

    async def List(self, request: pb.ListTasksRequest, context: Ctx) -> pb.ListTasksResponse:
        return pb.ListTasksResponse(tasks=await self._svc.list_tasks())

    async def Kill(self, request: pb.KillRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.kill(request.container_id, request.exec_id, request.signal, request.all)
        return empty_pb2.Empty()

    async def Exec(self, request: pb.ExecProcessRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.exec(
            request.container_id,
            request.exec_id,
            request.stdin,
            request.stdout,
            request.stderr,
            request.terminal,
            request.spec,
        )
        return empty_pb2.Empty()

    async def ResizePty(self, request: pb.ResizePtyRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.resize_pty(
            request.container_id, request.exec_id, request.width, request.height
        )
        return empty_pb2.Empty()

    async def CloseIO(self, request: pb.CloseIORequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.close_io(request.container_id, request.exec_id, request.stdin)
        return empty_pb2.Empty()

    async def Pause(self, request: pb.PauseTaskRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.pause(request.container_id)
        return empty_pb2.Empty()

    async def Resume(self, request: pb.ResumeTaskRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.resume(request.container_id)
        return empty_pb2.Empty()

    async def ListPids(self, request: pb.ListPidsRequest, context: Ctx) -> pb.ListPidsResponse:
        return pb.ListPidsResponse(processes=await self._svc.pids(request.container_id))

    async def Checkpoint(
        self, request: pb.CheckpointTaskRequest, context: Ctx
    ) -> pb.CheckpointTaskResponse:
        raise Unimplemented("checkpoint requires criu, which is not installed")

    async def Update(self, request: pb.UpdateTaskRequest, context: Ctx) -> empty_pb2.Empty:
        await self._svc.update(request.container_id, request.resources, dict(request.annotations))
        return empty_pb2.Empty()

    async def Metrics(self, request: pb.MetricsRequest, context: Ctx) -> pb.MetricsResponse:
        return pb.MetricsResponse(metrics=await self._svc.metrics(list(request.filters)))

    async def Wait(self, request: pb.WaitRequest, context: Ctx) -> pb.WaitResponse:
        resp = await self._svc.wait(request.container_id, request.exec_id)
        out = pb.WaitResponse(exit_status=resp.exit_status)
        if resp.HasField("exited_at"):
            out.exited_at.CopyFrom(resp.exited_at)
        return out
