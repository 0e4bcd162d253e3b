"""Registrations of the runtime (``io.containerd.runtime.v2.task``), the tasks service and
API, and the ttrpc endpoint on which shims publish their events."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import sys
from typing import TYPE_CHECKING, Any

from google.protobuf import empty_pb2

from pycontainerd import ttrpc
from pycontainerd.api.services.events.v1 import events_pb2
from pycontainerd.api.services.ttrpc.events.v1 import events_pb2 as ttrpc_events_pb2
from pycontainerd.errdefs import PycdError
from pycontainerd.events.exchange import Exchange
from pycontainerd.grpc.tasks import TasksServicer
from pycontainerd.metadata.db import MetadataDB
from pycontainerd.plugin import InitContext, PluginType, Registration
from pycontainerd.services.tasks import TasksService
from pycontainerd.snapshots.metadata import SnapshotService
from pycontainerd.tasks.manager import TaskManager

if TYPE_CHECKING:
    from collections.abc import Mapping

    from pycontainerd.tasks.bundle import Bundle
    from pycontainerd.tasks.manager import ShimStarter

log = logging.getLogger(__name__)

TTRPC_EVENTS = "containerd.services.events.ttrpc.v1.Events"


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeConfig:
    # Runtime name → shim binary path, for shims not on PATH as containerd-shim-<name>-<v>.
    runtimes: dict[str, str] = dataclasses.field(default_factory=dict)


class EventsReceiver:
    """The ttrpc server on ``<address>.ttrpc``: shims forward their task events here."""

    def __init__(self, exchange: Exchange) -> None:
        self._exchange = exchange
        self.server = ttrpc.Server()
        self.server.register(
            TTRPC_EVENTS, {"Forward": ttrpc.Method(ttrpc_events_pb2.ForwardRequest, self._forward)}
        )

    async def _forward(
        self, req: ttrpc_events_pb2.ForwardRequest, md: Mapping[str, str]
    ) -> empty_pb2.Empty:
        env = events_pb2.Envelope()
        env.ParseFromString(req.envelope.SerializeToString())
        self._exchange.forward(env)
        return empty_pb2.Empty()

    async def close(self) -> None:
        await self.server.close()


def _publish_binary() -> str:
    return shutil.which("pycontainerd") or os.path.join(
        os.path.dirname(sys.executable), "pycontainerd"
    )


async def _init_events(ic: InitContext) -> EventsReceiver:
    recv = EventsReceiver(ic.get(PluginType.EVENT, Exchange))
    await recv.server.serve(ic.ttrpc_address, mode=0o660)
    ic.exports["address"] = ic.ttrpc_address
    return recv


PYRUNC = "io.containerd.pyrunc.v1"


def _pyrunc_starter(ic: InitContext) -> ShimStarter:
    """Our own shim is forked from a preloaded zygote in-process, not exec'd."""
    from pycontainerd.shim import launcher

    async def start_pyrunc(b: Bundle, runtime: str, options: bytes) -> str:
        return await launcher.start_shim(
            b.namespace, b.id, str(b.path), ic.address, ic.ttrpc_address, options
        )

    return start_pyrunc


def _retire_zygote(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("cannot retire shim zygote %s: %s", path, exc)


class _Runtime(TaskManager):
    """The task manager, retiring our shim's zygote when the daemon stops."""

    def __init__(self, *args: Any, zygote: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._zygote = zygote

    async def close(self) -> None:
        await super().close()
        if self._zygote:
            _retire_zygote(self._zygote)


async def _init_runtime(ic: InitContext) -> TaskManager:
    from pycontainerd.shim.address import zygote_path

    cfg: RuntimeConfig = ic.config
    ic.platforms.append("linux/amd64")
    # A configured binary for our runtime replaces the in-process launcher and its zygote.
    zygote = "" if PYRUNC in cfg.runtimes else zygote_path(ic.address)
    if zygote:
        # A zygote left by an earlier daemon may run older code: removing its socket makes
        # it exit (running shims are separate processes and stay); a new one starts on use.
        _retire_zygote(zygote)
    return _Runtime(
        ic.root,
        ic.state,
        grpc_address=ic.address,
        ttrpc_address=ic.ttrpc_address,
        publisher=ic.get(PluginType.EVENT, Exchange),
        publish_binary=_publish_binary(),
        runtimes=cfg.runtimes,
        starters={PYRUNC: _pyrunc_starter(ic)} if zygote else {},
        zygote=zygote,
    )


async def _init_service(ic: InitContext) -> TasksService:
    manager = ic.get(PluginType.RUNTIME_V2, TaskManager)
    try:
        snapshots: SnapshotService | None = ic.get_by_id(
            PluginType.SERVICE, "snapshots-service", SnapshotService
        )
    except PycdError:
        snapshots = None
    svc = TasksService(manager, ic.get(PluginType.METADATA, MetadataDB), snapshots)
    await manager.load(svc.container_exists)
    return svc


async def _init_grpc(ic: InitContext) -> TasksServicer:
    return TasksServicer(ic.get_by_id(PluginType.SERVICE, "tasks-service", TasksService))


events_receiver = Registration(
    type=PluginType.TTRPC, id="events", init=_init_events, requires=(PluginType.EVENT,)
)
runtime = Registration(
    type=PluginType.RUNTIME_V2,
    id="task",
    init=_init_runtime,
    requires=(PluginType.EVENT, PluginType.METADATA),
    config=RuntimeConfig,
)
tasks_service = Registration(
    type=PluginType.SERVICE,
    id="tasks-service",
    init=_init_service,
    requires=(PluginType.RUNTIME_V2, PluginType.METADATA),
)
tasks = Registration(
    type=PluginType.GRPC, id="tasks", init=_init_grpc, requires=(PluginType.SERVICE,)
)
