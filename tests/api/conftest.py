"""API-test fixtures: an in-process grpc.aio server on a short unix socket path.

``serve(*services)`` starts a server with the production interceptor, registers each
``GRPCService`` on it, and returns a client channel to it. Unix socket paths are limited to
108 bytes, so the socket lives in a fresh directory directly under /tmp, not in tmp_path.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import pytest

from pycontainerd.grpc.interceptors import ContextInterceptor

if TYPE_CHECKING:
    from pycontainerd.grpc import GRPCService

Serve = Callable[..., Awaitable[grpc.aio.Channel]]


@pytest.fixture
def socket_path() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="pcd-", dir="/tmp"))
    yield d / "grpc.sock"
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
async def serve(socket_path: Path) -> AsyncIterator[Serve]:
    servers: list[grpc.aio.Server] = []
    channels: list[grpc.aio.Channel] = []

    async def start(*services: GRPCService) -> grpc.aio.Channel:
        server = grpc.aio.server(interceptors=[ContextInterceptor()])
        for svc in services:
            svc.register(server)
        server.add_insecure_port(f"unix://{socket_path}")
        await server.start()
        servers.append(server)
        channel = grpc.aio.insecure_channel(f"unix://{socket_path}")
        channels.append(channel)
        return channel

    yield start
    for channel in channels:
        await channel.close()
    for server in servers:
        await server.stop(None)
