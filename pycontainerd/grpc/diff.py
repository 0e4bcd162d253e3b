"""containerd.services.diff.v1.Diff over the differ."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pycontainerd.api.services.diff.v1 import diff_pb2 as pb
from pycontainerd.api.services.diff.v1 import diff_pb2_grpc
from pycontainerd.api.types import descriptor_pb2, mount_pb2
from pycontainerd.diff.service import Descriptor, Differ
from pycontainerd.namespaces import namespace_required
from pycontainerd.snapshots.mount import Mount

if TYPE_CHECKING:
    from collections.abc import Iterable

    import grpc.aio

    Ctx = grpc.aio.ServicerContext[Any, Any]


def mounts_from_proto(mounts: Iterable[mount_pb2.Mount]) -> list[Mount]:
    return [Mount(m.type, m.source, m.target, tuple(m.options)) for m in mounts]


def _desc(d: Descriptor) -> descriptor_pb2.Descriptor:
    return descriptor_pb2.Descriptor(
        media_type=d.media_type, digest=d.digest, size=d.size, annotations=d.annotations
    )


class DiffServicer(diff_pb2_grpc.DiffServicer):
    def __init__(self, differ: Differ) -> None:
        self._differ = differ

    def register(self, server: grpc.aio.Server) -> None:
        diff_pb2_grpc.add_DiffServicer_to_server(self, server)

    async def Apply(self, request: pb.ApplyRequest, context: Ctx) -> pb.ApplyResponse:
        namespace_required()
        d = request.diff
        applied = await self._differ.apply(
            Descriptor(d.media_type, d.digest, d.size, dict(d.annotations)),
            mounts_from_proto(request.mounts),
        )
        return pb.ApplyResponse(applied=_desc(applied))

    async def Diff(self, request: pb.DiffRequest, context: Ctx) -> pb.DiffResponse:
        namespace_required()
        made = await self._differ.diff(
            mounts_from_proto(request.left),
            mounts_from_proto(request.right),
            request.media_type,
            request.ref,
            dict(request.labels),
        )
        return pb.DiffResponse(diff=_desc(made))
