"""grpc.health.v1.Health: SERVING while the daemon runs, NOT_SERVING once it stops."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

import grpc.aio

from pycontainerd.api.grpc.health.v1 import health_pb2 as pb
from pycontainerd.api.grpc.health.v1 import health_pb2_grpc

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

Ctx = grpc.aio.ServicerContext[Any, Any]


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status = pb.HealthCheckResponse.SERVING
        self._changed = asyncio.Event()

    def register(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self, server)

    def set_serving(self, serving: bool) -> None:
        self._status = (
            pb.HealthCheckResponse.SERVING if serving else pb.HealthCheckResponse.NOT_SERVING
        )
        self._changed.set()
        self._changed = asyncio.Event()

    async def Check(self, request: pb.HealthCheckRequest, context: Ctx) -> pb.HealthCheckResponse:
        return pb.HealthCheckResponse(status=self._status)

    async def Watch(
        self, request: pb.HealthCheckRequest, context: Ctx
    ) -> AsyncIterator[pb.HealthCheckResponse]:
        last = None
        while True:
            if self._status != last:
                last = self._status
                yield pb.HealthCheckResponse(status=last)
            await self._changed.wait()
