"""Registration of the CRI plugin (``io.containerd.grpc.v1.cri``): Kubernetes' runtime and
image services on the daemon's own socket, over the daemon's stores in namespace k8s.io.

The implementation (the SDK, CNI, the streaming servers, ~0.2 s of imports) is loaded in a worker
thread once the daemon starts, not while it boots: the daemon answers its first RPC in
the time containerd's users expect, and a CRI call that arrives before the load finishes
waits for it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from typing import TYPE_CHECKING, Any, cast

from pycontainerd.cri.options import CRIConfig
from pycontainerd.events.exchange import Exchange
from pycontainerd.plugin import InitContext, PluginType, Registration

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    import grpc.aio

__all__ = ["cri"]

log = logging.getLogger(__name__)

# The one server-streaming method of the two services.
_STREAMING = frozenset({"GetContainerEvents"})


class LazyCRI:
    """The plugin instance: registers the services now, builds them after start-up."""

    def __init__(self, ic: InitContext) -> None:
        self._ic = ic
        self._exchange = ic.get(PluginType.EVENT, Exchange)
        self._service: Any = None
        self._ready: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        # The daemon's gRPC server, handed over by register(): the CRI's client calls it
        # in-process (grpc.local) rather than through the socket.
        self._server: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._load(), name="cri-load")

    async def _load(self) -> None:
        try:
            await asyncio.to_thread(importlib.import_module, "pycontainerd.cri.servicer")
            self._service = self._build(await self._server)
            self._ready.set_result(self._service)
        except Exception as exc:
            log.exception("CRI plugin failed to load")
            self._ready.set_exception(exc)

    def _build(self, server: Any) -> Any:
        from pycontainerd.cri.runtime import CRIRuntime
        from pycontainerd.cri.servicer import CRIService
        from pycontainerd.grpc.local import LocalChannel
        from pycontainerd.grpc.transport import Server
        from pycontainerd.network import NetworkManager

        ic = self._ic
        cfg: CRIConfig = ic.config
        network = NetworkManager(
            ic.state / "cni",
            cfg.cni_bin_dirs,
            cfg.cni_conf_dir or None,
            netns_dir=cfg.netns_dir or ic.state / "netns",
            bridge=cfg.cni_bridge,
            subnet=cfg.cni_subnet,
            default_network=cfg.cni_network,
        )
        rt = CRIRuntime(
            cfg,
            address=ic.address,
            root=ic.root,
            state=ic.state,
            exchange=self._exchange,
            network=network,
            # A grpc.aio server (tests that register the plugin on one) keeps the socket.
            # (LocalChannel has the parts of grpc.aio.Channel the SDK uses.)
            channel=cast("grpc.aio.Channel", LocalChannel(server))
            if isinstance(server, Server)
            else None,
        )
        # Subscribes to task events now; recovery waits until the daemon serves its socket.
        rt.start()
        snapshotter_root = ic.root.parent / f"{PluginType.SNAPSHOTTER}.{cfg.snapshotter}"
        return CRIService(rt, snapshotter_root)

    async def service(self) -> Any:
        return await asyncio.shield(self._ready)

    def register(self, server: grpc.aio.Server) -> None:
        from pycontainerd.api.cri.runtime.v1 import api_pb2_grpc

        if not self._server.done():
            self._server.set_result(server)

        api_pb2_grpc.add_RuntimeServiceServicer_to_server(_Proxy(self, "runtime"), server)  # type: ignore[arg-type]
        api_pb2_grpc.add_ImageServiceServicer_to_server(_Proxy(self, "images"), server)  # type: ignore[arg-type]

    async def close(self) -> None:
        if not self._task.done():
            self._task.cancel()
        svc = self._service
        close = getattr(svc, "close", None)
        if close is not None:
            result = close()
            if asyncio.iscoroutine(result):
                await result


class _Proxy:
    """Stands in for a servicer: each method waits for the real one, then calls it."""

    def __init__(self, owner: LazyCRI, part: str) -> None:
        self._owner = owner
        self._part = part

    def __getattr__(self, name: str) -> Callable[..., Any]:
        owner, part = self._owner, self._part
        if name in _STREAMING:

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                svc = getattr(await owner.service(), part)
                async for item in getattr(svc, name)(request, context):
                    yield item

            return stream

        async def unary(request: Any, context: Any) -> Any:
            svc = getattr(await owner.service(), part)
            return await getattr(svc, name)(request, context)

        return unary


async def _init(ic: InitContext) -> LazyCRI:
    return LazyCRI(ic)


cri = Registration(
    type=PluginType.GRPC,
    id="cri",
    init=_init,
    requires=(PluginType.EVENT, PluginType.SERVICE),
    config=CRIConfig,
)
