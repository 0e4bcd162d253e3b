"""The gRPC face of the CRI: ``runtime.v1.RuntimeService`` and ``runtime.v1.ImageService``.

Thin: each method unpacks the request, calls the sandbox, container or image service and
packs the answer. Errors are domain errors (NotFound for unknown ids, the name-conflict
error as UNKNOWN like containerd's), mapped by the daemon's interceptor. Methods not
served yet (checkpoints, streamed metrics) answer UNIMPLEMENTED,
which kubelet treats as "feature absent" where it has a fallback.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from pycontainerd.api.cri.runtime.v1 import api_pb2, api_pb2_grpc
from pycontainerd.cri.container import ContainerService
from pycontainerd.cri.sandbox import SandboxService
from pycontainerd.cri.stats import METRIC_DESCRIPTORS, StatsService
from pycontainerd.cri.streaming import StreamServer
from pycontainerd.errdefs import NotFound, PycdError, ResourceExhausted, Unimplemented

if TYPE_CHECKING:
    from collections.abc import AsyncIterator
    from pathlib import Path

    import grpc

    from pycontainerd.cri.images import ImageInfo
    from pycontainerd.cri.runtime import ContainerEvent, CRIRuntime
    from pycontainerd.grpc.transport import Wire

__all__ = ["CRIService", "ImageServicer", "RuntimeServicer"]

log = logging.getLogger(__name__)

RUNTIME_NAME = "pycontainerd"
RUNTIME_VERSION = "0.1.0"
RUNTIME_API_VERSION = "v1"
KUBE_API_VERSION = "0.1.0"

Ctx = Any


class RuntimeServicer(api_pb2_grpc.RuntimeServiceServicer):
    def __init__(self, rt: CRIRuntime, streams: StreamServer, stats: StatsService) -> None:
        self.rt = rt
        self.sandboxes = SandboxService(rt)
        self.containers = ContainerService(rt)
        self.streams = streams
        self.stats = stats

    async def Version(
        self, request: api_pb2.VersionRequest, context: Ctx
    ) -> api_pb2.VersionResponse:
        return api_pb2.VersionResponse(
            version=KUBE_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=RUNTIME_VERSION,
            runtime_api_version=RUNTIME_API_VERSION,
        )

    async def RunPodSandbox(
        self, request: api_pb2.RunPodSandboxRequest, context: Ctx
    ) -> api_pb2.RunPodSandboxResponse:
        id_ = await self.sandboxes.run(request.config, request.runtime_handler)
        return api_pb2.RunPodSandboxResponse(pod_sandbox_id=id_)

    async def StopPodSandbox(
        self, request: api_pb2.StopPodSandboxRequest, context: Ctx
    ) -> api_pb2.StopPodSandboxResponse:
        await self.sandboxes.stop(request.pod_sandbox_id)
        return api_pb2.StopPodSandboxResponse()

    async def RemovePodSandbox(
        self, request: api_pb2.RemovePodSandboxRequest, context: Ctx
    ) -> api_pb2.RemovePodSandboxResponse:
        await self.sandboxes.remove(request.pod_sandbox_id)
        return api_pb2.RemovePodSandboxResponse()

    async def PodSandboxStatus(
        self, request: api_pb2.PodSandboxStatusRequest, context: Ctx
    ) -> api_pb2.PodSandboxStatusResponse:
        return await self.sandboxes.status(request.pod_sandbox_id, request.verbose)

    # Answers in wire form (transport.Wire), which the stubs' types cannot express.
    async def ListPodSandbox(  # type: ignore[override]
        self, request: api_pb2.ListPodSandboxRequest, context: Ctx
    ) -> api_pb2.ListPodSandboxResponse | Wire:
        f = request.filter if request.HasField("filter") else None
        return await self.sandboxes.list_sandboxes(f)

    async def CreateContainer(
        self, request: api_pb2.CreateContainerRequest, context: Ctx
    ) -> api_pb2.CreateContainerResponse:
        id_ = await self.containers.create(request.pod_sandbox_id, request.config)
        return api_pb2.CreateContainerResponse(container_id=id_)

    async def StartContainer(
        self, request: api_pb2.StartContainerRequest, context: Ctx
    ) -> api_pb2.StartContainerResponse:
        await self.containers.start(request.container_id)
        return api_pb2.StartContainerResponse()

    async def StopContainer(
        self, request: api_pb2.StopContainerRequest, context: Ctx
    ) -> api_pb2.StopContainerResponse:
        await self.containers.stop(request.container_id, request.timeout)
        return api_pb2.StopContainerResponse()

    async def RemoveContainer(
        self, request: api_pb2.RemoveContainerRequest, context: Ctx
    ) -> api_pb2.RemoveContainerResponse:
        await self.containers.remove(request.container_id)
        return api_pb2.RemoveContainerResponse()

    # Answers in wire form (transport.Wire), which the stubs' types cannot express.
    async def ListContainers(  # type: ignore[override]
        self, request: api_pb2.ListContainersRequest, context: Ctx
    ) -> api_pb2.ListContainersResponse | Wire:
        f = request.filter if request.HasField("filter") else None
        return await self.containers.list_containers(f)

    async def ContainerStatus(
        self, request: api_pb2.ContainerStatusRequest, context: Ctx
    ) -> api_pb2.ContainerStatusResponse:
        return await self.containers.status(request.container_id, request.verbose)

    async def UpdateContainerResources(
        self, request: api_pb2.UpdateContainerResourcesRequest, context: Ctx
    ) -> api_pb2.UpdateContainerResourcesResponse:
        await self.containers.update_resources(request.container_id, request.linux)
        return api_pb2.UpdateContainerResourcesResponse()

    async def ReopenContainerLog(
        self, request: api_pb2.ReopenContainerLogRequest, context: Ctx
    ) -> api_pb2.ReopenContainerLogResponse:
        await self.containers.reopen_log(request.container_id)
        return api_pb2.ReopenContainerLogResponse()

    async def ExecSync(
        self, request: api_pb2.ExecSyncRequest, context: Ctx
    ) -> api_pb2.ExecSyncResponse:
        out, err, code = await self.containers.exec_sync(
            request.container_id, list(request.cmd), request.timeout
        )
        return api_pb2.ExecSyncResponse(stdout=out, stderr=err, exit_code=code)

    async def Exec(self, request: api_pb2.ExecRequest, context: Ctx) -> api_pb2.ExecResponse:
        return api_pb2.ExecResponse(url=await self.streams.exec_url(request))

    async def Attach(self, request: api_pb2.AttachRequest, context: Ctx) -> api_pb2.AttachResponse:
        return api_pb2.AttachResponse(url=await self.streams.attach_url(request))

    async def PortForward(
        self, request: api_pb2.PortForwardRequest, context: Ctx
    ) -> api_pb2.PortForwardResponse:
        return api_pb2.PortForwardResponse(url=await self.streams.port_forward_url(request))

    async def ContainerStats(
        self, request: api_pb2.ContainerStatsRequest, context: Ctx
    ) -> api_pb2.ContainerStatsResponse:
        return api_pb2.ContainerStatsResponse(
            stats=await self.stats.container(request.container_id)
        )

    async def ListContainerStats(
        self, request: api_pb2.ListContainerStatsRequest, context: Ctx
    ) -> api_pb2.ListContainerStatsResponse:
        f = request.filter if request.HasField("filter") else None
        return api_pb2.ListContainerStatsResponse(stats=await self.stats.list_containers(f))

    async def PodSandboxStats(
        self, request: api_pb2.PodSandboxStatsRequest, context: Ctx
    ) -> api_pb2.PodSandboxStatsResponse:
        return api_pb2.PodSandboxStatsResponse(
            stats=await self.stats.sandbox(request.pod_sandbox_id)
        )

    async def ListPodSandboxStats(
        self, request: api_pb2.ListPodSandboxStatsRequest, context: Ctx
    ) -> api_pb2.ListPodSandboxStatsResponse:
        f = request.filter if request.HasField("filter") else None
        return api_pb2.ListPodSandboxStatsResponse(stats=await self.stats.list_sandboxes(f))

    async def GetContainerEvents(
        self, request: api_pb2.GetEventsRequest, context: Ctx
    ) -> AsyncIterator[api_pb2.ContainerEventResponse]:
        """Container and sandbox lifecycle events from now on (kubelet's Evented PLEG),
        each with the pod's status and its containers' statuses at sending time."""
        await self.rt.ready()
        q = self.rt.subscribe_events()
        try:
            # Headers now: a client awaiting them knows it misses nothing from here on.
            await context.send_initial_metadata(())
            while (ev := await q.get()) is not None:
                yield await self._event_pb(ev)
            raise ResourceExhausted("container event stream fell behind; events were dropped")
        finally:
            self.rt.unsubscribe_events(q)

    async def _event_pb(self, ev: ContainerEvent) -> api_pb2.ContainerEventResponse:
        resp = api_pb2.ContainerEventResponse(
            container_id=ev.id_, container_event_type=ev.kind, created_at=ev.at
        )
        try:
            resp.pod_sandbox_status.CopyFrom((await self.sandboxes.status(ev.sandbox_id)).status)
        except NotFound:
            return resp  # the pod is gone
        for c in list(self.rt.containers.values()):
            if c.meta.sandbox_id == ev.sandbox_id:
                try:
                    resp.containers_statuses.append(
                        (await self.containers.status(c.meta.id)).status
                    )
                except NotFound:
                    continue  # removed meanwhile
        return resp

    async def ListMetricDescriptors(
        self, request: api_pb2.ListMetricDescriptorsRequest, context: Ctx
    ) -> api_pb2.ListMetricDescriptorsResponse:
        return api_pb2.ListMetricDescriptorsResponse(descriptors=METRIC_DESCRIPTORS)

    async def ListPodSandboxMetrics(
        self, request: api_pb2.ListPodSandboxMetricsRequest, context: Ctx
    ) -> api_pb2.ListPodSandboxMetricsResponse:
        return api_pb2.ListPodSandboxMetricsResponse(pod_metrics=await self.stats.pod_metrics())

    async def UpdateRuntimeConfig(
        self, request: api_pb2.UpdateRuntimeConfigRequest, context: Ctx
    ) -> api_pb2.UpdateRuntimeConfigResponse:
        # The pod CIDR comes from our CNI config; like containerd without a CNI template,
        # there is nothing to regenerate.
        return api_pb2.UpdateRuntimeConfigResponse()

    async def Status(self, request: api_pb2.StatusRequest, context: Ctx) -> api_pb2.StatusResponse:
        runtime_ok, runtime_msg = True, ""
        try:
            await self.rt.ready()
        except PycdError as exc:
            runtime_ok, runtime_msg = False, str(exc)
        net_ok, net_msg = True, ""
        try:
            await self.rt.network.status()
        except PycdError as exc:
            net_ok, net_msg = False, f"cni plugin not initialized: {exc}"
        conditions = [
            api_pb2.RuntimeCondition(
                type="RuntimeReady", status=runtime_ok,
                reason="" if runtime_ok else "RuntimeNotReady", message=runtime_msg,
            ),
            api_pb2.RuntimeCondition(
                type="NetworkReady", status=net_ok,
                reason="" if net_ok else "NetworkPluginNotReady", message=net_msg,
            ),
        ]  # fmt: skip
        return api_pb2.StatusResponse(
            status=api_pb2.RuntimeStatus(conditions=conditions),
            runtime_handlers=[api_pb2.RuntimeHandler(name="")],
        )


def _image_pb(info: ImageInfo) -> api_pb2.Image:
    img = api_pb2.Image(
        id=info.id,
        repo_tags=info.repo_tags,
        repo_digests=info.repo_digests,
        size=info.size,
        spec=api_pb2.ImageSpec(image=info.id),
    )
    user = info.user.partition(":")[0]
    if user.isdigit():
        img.uid.value = int(user)
    elif user:
        img.username = user
    return img


class ImageServicer(api_pb2_grpc.ImageServiceServicer):
    def __init__(self, rt: CRIRuntime, snapshotter_root: Path) -> None:
        self.rt = rt
        self.snapshotter_root = snapshotter_root

    async def ListImages(
        self, request: api_pb2.ListImagesRequest, context: Ctx
    ) -> api_pb2.ListImagesResponse:
        await self.rt.ready()
        want = request.filter.image.image
        if want:
            try:
                infos = [await self.rt.images.find(want)]
            except NotFound:
                infos = []
        else:
            infos = await self.rt.images.list()
        return api_pb2.ListImagesResponse(images=[_image_pb(i) for i in infos])

    async def ImageStatus(
        self, request: api_pb2.ImageStatusRequest, context: Ctx
    ) -> api_pb2.ImageStatusResponse:
        await self.rt.ready()
        try:
            info = await self.rt.images.find(request.image.image)
        except NotFound:
            return api_pb2.ImageStatusResponse()  # absent: no image, no error
        return api_pb2.ImageStatusResponse(image=_image_pb(info))

    async def PullImage(
        self, request: api_pb2.PullImageRequest, context: Ctx
    ) -> api_pb2.PullImageResponse:
        await self.rt.ready()
        a = request.auth
        info = await self.rt.images.pull(request.image.image, a.username, a.password, a.auth)
        return api_pb2.PullImageResponse(image_ref=info.id)

    async def RemoveImage(
        self, request: api_pb2.RemoveImageRequest, context: Ctx
    ) -> api_pb2.RemoveImageResponse:
        await self.rt.ready()
        await self.rt.images.remove(request.image.image)
        return api_pb2.RemoveImageResponse()

    async def ImageFsInfo(
        self, request: api_pb2.ImageFsInfoRequest, context: Ctx
    ) -> api_pb2.ImageFsInfoResponse:
        used, inodes = await self.rt.images.fs_usage(str(self.snapshotter_root))
        usage = api_pb2.FilesystemUsage(
            timestamp=time.time_ns(),
            fs_id=api_pb2.FilesystemIdentifier(mountpoint=str(self.snapshotter_root)),
            used_bytes=api_pb2.UInt64Value(value=used),
            inodes_used=api_pb2.UInt64Value(value=inodes),
        )
        return api_pb2.ImageFsInfoResponse(image_filesystems=[usage])


def _unimplemented(servicer: type, service: str) -> None:
    """Make every method ``servicer`` does not define answer UNIMPLEMENTED."""
    desc = api_pb2.DESCRIPTOR.services_by_name[service]
    for m in desc.methods:
        if m.name in servicer.__dict__:
            continue
        if m.server_streaming:

            async def stream(
                self: object, request: object, context: Ctx, _n: str = m.name
            ) -> AsyncIterator[Any]:
                raise Unimplemented(f"{service}.{_n}")
                yield  # type: ignore[unreachable]  # makes this an async generator

            setattr(servicer, m.name, stream)
        else:

            async def unary(self: object, request: object, context: Ctx, _n: str = m.name) -> Any:
                raise Unimplemented(f"{service}.{_n}")

            setattr(servicer, m.name, unary)
    servicer.__abstractmethods__ = frozenset()  # type: ignore[attr-defined]


_unimplemented(RuntimeServicer, "RuntimeService")
_unimplemented(ImageServicer, "ImageService")


class CRIService:
    """The GRPCService the plugin returns: both CRI services on the daemon's server."""

    def __init__(self, rt: CRIRuntime, snapshotter_root: Path) -> None:
        self.rt = rt
        cfg = rt.cfg
        self.streams = StreamServer(rt, cfg.stream_server_address, int(cfg.stream_server_port or 0))
        # Listen now, so a bad address shows in the log at start-up; URL requests retry.
        rt.spawn(self._start_streams())
        self.stats = StatsService(rt, snapshotter_root)
        # The generated bases mark every method abstract; _unimplemented() filled in the
        # ones not served, which mypy cannot see.
        self.runtime = RuntimeServicer(rt, self.streams, self.stats)  # type: ignore[abstract]
        self.images = ImageServicer(rt, snapshotter_root)  # type: ignore[abstract]

    def register(self, server: grpc.aio.Server) -> None:
        api_pb2_grpc.add_RuntimeServiceServicer_to_server(self.runtime, server)
        api_pb2_grpc.add_ImageServiceServicer_to_server(self.images, server)

    async def _start_streams(self) -> None:
        try:
            await self.streams.start()
        except OSError as exc:
            log.error("CRI streaming server cannot listen: %s", exc)

    async def close(self) -> None:
        await self.streams.close()
        await self.rt.close()
