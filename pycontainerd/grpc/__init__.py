"""gRPC servicers: thin layers that decode protobuf, call a domain service, encode the answer.

A plugin of type ``io.containerd.grpc.v1`` returns an object satisfying ``GRPCService``;
the server calls ``register`` on each once every plugin is up. Servicers never choose
status codes: they raise ``pycontainerd.errdefs`` errors and the interceptor maps them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import grpc.aio


@runtime_checkable
class GRPCService(Protocol):
    """What a grpc.v1 plugin instance provides."""

    def register(self, server: grpc.aio.Server) -> None:
        """Add this service's handlers to ``server``."""
