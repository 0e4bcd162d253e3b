"""containerd.services.snapshots.v1.Snapshots over the namespaced snapshot layer.

The request's ``snapshotter`` field picks the snapshotter (missing or not loaded:
InvalidArgument, as containerd). List streams its results in batches of 100 infos.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc.aio
from google.protobuf import empty_pb2

from pycontainerd.api.services.snapshots.v1 import snapshots_pb2 as pb
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2_grpc
from pycontainerd.api.types import mount_pb2
from pycontainerd.grpc.convert import from_timestamp, timestamp
from pycontainerd.snapshots.snapshotter import Info, Kind, Mount

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping, Sequence

    from pycontainerd.snapshots.metadata import SnapshotService

__all__ = ["SnapshotsServicer", "info_from_pb", "info_to_pb", "mounts_to_pb"]

Ctx = grpc.aio.ServicerContext[Any, Any]

LIST_BATCH = 100


def mounts_to_pb(mounts: Sequence[Mount]) -> list[mount_pb2.Mount]:
    return [
        mount_pb2.Mount(type=m.type, source=m.source, target=m.target, options=list(m.options))
        for m in mounts
    ]


def info_to_pb(info: Info) -> pb.Info:
    return pb.Info(
        name=info.name,
        parent=info.parent,
        kind=int(info.kind),  # type: ignore[arg-type]
        created_at=timestamp(info.created_at),
        updated_at=timestamp(info.updated_at),
        labels=dict(info.labels),
    )


def info_from_pb(msg: pb.Info) -> Info:
    try:
        kind = Kind(int(msg.kind))
    except ValueError:
        kind = Kind.UNKNOWN
    return Info(
        name=msg.name,
        kind=kind,
        parent=msg.parent,
        labels=dict(msg.labels),
        created_at=from_timestamp(msg.created_at),
        updated_at=from_timestamp(msg.updated_at),
    )


def _labels(labels: Mapping[str, str]) -> dict[str, str]:
    return dict(labels)


class SnapshotsServicer(snapshots_pb2_grpc.SnapshotsServicer):
    def __init__(self, service: SnapshotService) -> None:
        self._svc = service

    def register(self, server: grpc.aio.Server) -> None:
        snapshots_pb2_grpc.add_SnapshotsServicer_to_server(self, server)

    async def Prepare(
        self, request: pb.PrepareSnapshotRequest, context: Ctx
    ) -> pb.PrepareSnapshotResponse:
        sn = self._svc.get(request.snapshotter)
        mounts = await sn.prepare(request.key, request.parent, _labels(request.labels))
        return pb.PrepareSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def View(self, request: pb.ViewSnapshotRequest, context: Ctx) -> pb.ViewSnapshotResponse:
        sn = self._svc.get(request.snapshotter)
        mounts = await sn.view(request.key, request.parent, _labels(request.labels))
        return pb.ViewSnapshotResponse(mounts=mounts_to_pb(mounts))

    async def Mounts(self, request: pb.MountsRequest, context: Ctx) -> pb.MountsResponse:
        sn = self._svc.get(request.snapshotter)
        return pb.MountsResponse(mounts=mounts_to_pb(await sn.mounts(request.key)))

    async def Commit(self, request: pb.CommitSnapshotRequest, context: Ctx) -> empty_pb2.Empty:
        sn = self._svc.get(request.snapshotter)
        await sn.commit(request.name, request.key, _labels(request.labels))
        return empty_pb2.Empty()

    async def Remove(self, request: pb.RemoveSnapshotRequest, context: Ctx) -> empty_pb2.Empty:
        sn = self._svc.get(request.snapshotter)
        await sn.remove(request.key)
        return empty_pb2.Empty()

    async def Stat(self, request: pb.StatSnapshotRequest, context: Ctx) -> pb.StatSnapshotResponse:
        sn = self._svc.get(request.snapshotter)
        return pb.StatSnapshotResponse(info=info_to_pb(await sn.stat(request.key)))

    async def Update(
        self, request: pb.UpdateSnapshotRequest, context: Ctx
    ) -> pb.UpdateSnapshotResponse:
        sn = self._svc.get(request.snapshotter)
        info = await sn.update(info_from_pb(request.info), list(request.update_mask.paths))
        return pb.UpdateSnapshotResponse(info=info_to_pb(info))

    async def List(
        self, request: pb.ListSnapshotsRequest, context: Ctx
    ) -> AsyncIterator[pb.ListSnapshotsResponse]:
        sn = self._svc.get(request.snapshotter)
        infos = await sn.walk(list(request.filters))
        for i in range(0, len(infos), LIST_BATCH):
            yield pb.ListSnapshotsResponse(info=[info_to_pb(x) for x in infos[i : i + LIST_BATCH]])

    async def Usage(self, request: pb.UsageRequest, context: Ctx) -> pb.UsageResponse:
        sn = self._svc.get(request.snapshotter)
        usage = await sn.usage(request.key)
        return pb.UsageResponse(size=usage.size, inodes=usage.inodes)

    async def Cleanup(self, request: pb.CleanupRequest, context: Ctx) -> empty_pb2.Empty:
        sn = self._svc.get(request.snapshotter)
        await sn.cleanup()
        return empty_pb2.Empty()
