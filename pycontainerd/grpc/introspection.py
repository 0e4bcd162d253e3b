"""containerd.services.introspection.v1.Introspection: loaded plugins and server identity.

``Plugins`` reports every registration with its init error (``ctr plugins ls`` prints
``ok``, ``skip`` or ``error`` from it). ``Server`` returns a UUID created once and kept in
the plugin's root, plus the daemon's pid and pid-namespace inode.
"""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

import grpc.aio
from google.rpc import status_pb2

from pycontainerd import filters
from pycontainerd.api.services.introspection.v1 import introspection_pb2, introspection_pb2_grpc
from pycontainerd.api.types import platform_pb2
from pycontainerd.plugin import Plugin, PluginSet, SkipPlugin

if TYPE_CHECKING:
    from pathlib import Path

    from google.protobuf import empty_pb2


def load_uuid(root: Path) -> str:
    """The server UUID stored under ``root``, created on first use (sync: call in a thread)."""
    path = root / "uuid"
    try:
        value = path.read_text().strip()
        uuid.UUID(value)
        return value
    except (OSError, ValueError):
        pass
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    value = str(uuid.uuid4())
    tmp = path.with_suffix(".tmp")
    tmp.write_text(value)
    os.replace(tmp, path)
    return value


def _pidns() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def plugin_message(p: Plugin) -> introspection_pb2.Plugin:
    reg = p.registration
    msg = introspection_pb2.Plugin(
        type=str(reg.type),
        id=reg.id,
        requires=[str(t) for t in reg.requires],
        exports=p.exports,
        capabilities=list(reg.capabilities),
    )
    for plat in p.platforms:
        parts = plat.split("/")
        msg.platforms.append(
            platform_pb2.Platform(
                os=parts[0],
                architecture=parts[1] if len(parts) > 1 else "",
                variant=parts[2] if len(parts) > 2 else "",
            )
        )
    if p.error is not None:
        code = grpc.StatusCode.UNKNOWN
        if not isinstance(p.error, SkipPlugin):
            code_attr = getattr(p.error, "code", None)
            if isinstance(code_attr, grpc.StatusCode):
                code = code_attr
        msg.init_err.CopyFrom(status_pb2.Status(code=code.value[0], message=str(p.error)))
    return msg


def _adaptor(msg: introspection_pb2.Plugin) -> filters.Adaptor:
    def get(path: Any) -> tuple[str, bool]:
        if not path:
            return "", False
        head = path[0]
        if head == "type":
            return msg.type, bool(msg.type)
        if head == "id":
            return msg.id, bool(msg.id)
        if head in ("capabilities", "capability") and len(path) == 1:
            return ",".join(msg.capabilities), bool(msg.capabilities)
        if head == "exports" and len(path) > 1:
            key = ".".join(path[1:])
            return msg.exports.get(key, ""), key in msg.exports
        return "", False

    return get


class IntrospectionServicer(introspection_pb2_grpc.IntrospectionServicer):
    def __init__(self, plugins: PluginSet, uuid_value: str) -> None:
        self._plugins = plugins
        self._uuid = uuid_value
        self._pid = os.getpid()
        self._pidns = _pidns()

    def register(self, server: grpc.aio.Server) -> None:
        introspection_pb2_grpc.add_IntrospectionServicer_to_server(self, server)

    async def Plugins(
        self, request: introspection_pb2.PluginsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> introspection_pb2.PluginsResponse:
        flt = filters.parse(list(request.filters))
        out = introspection_pb2.PluginsResponse()
        for p in self._plugins:
            msg = plugin_message(p)
            if flt.match(_adaptor(msg)):
                out.plugins.append(msg)
        return out

    async def Server(
        self, request: empty_pb2.Empty, context: grpc.aio.ServicerContext[Any, Any]
    ) -> introspection_pb2.ServerResponse:
        return introspection_pb2.ServerResponse(uuid=self._uuid, pid=self._pid, pidns=self._pidns)
