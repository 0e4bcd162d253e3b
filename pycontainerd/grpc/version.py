"""containerd.services.version.v1.Version: the daemon's version and revision."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pycontainerd import __version__
from pycontainerd.api.services.version.v1 import version_pb2, version_pb2_grpc

if TYPE_CHECKING:
    import grpc.aio
    from google.protobuf import empty_pb2

REVISION = "pycontainerd"


class VersionServicer(version_pb2_grpc.VersionServicer):
    def register(self, server: grpc.aio.Server) -> None:
        version_pb2_grpc.add_VersionServicer_to_server(self, server)

    async def Version(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> version_pb2.VersionResponse:
        return version_pb2.VersionResponse(version=__version__, revision=REVISION)
