"""The shim process: serves Task API sockets ("endpoints") on one asyncio loop.

A shim process is entered with a listening socket already bound by whoever answered
``start`` (so the daemon can connect before the server runs):

* forked by the zygote (``run_detached``, or ``run_spare`` for a pre-forked idle process
  that receives its first socket later), with everything here already imported;
* ``python -m pycontainerd.shim ... serve`` with the socket inherited (the fallback).

The process is detached (own session, reparented away from its starter), cwd = the first
bundle, stdin/stdout on ``/dev/null``, stderr on that bundle's ``log`` FIFO when the daemon
made one (containerd reads it), no other inherited descriptors, and a child subreaper.
Each endpoint is a complete shim (socket, Task service, namespace, publisher); an endpoint
ends at ``Shutdown`` once it has no containers (its socket is removed) and the process
exits when its last endpoint is gone (after ``LINGER_S`` if the zygote may send more).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

from pycontainerd.shim import address
from pycontainerd.shim.publisher import Publisher
from pycontainerd.shim.reaper import Reaper, set_subreaper
from pycontainerd.shim.service import TaskService
from pycontainerd.ttrpc import Server

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["Host", "ShimConfig", "run_detached", "run_spare", "serve"]

log = logging.getLogger(__name__)

LOG_FILE_ENV = "PYCONTAINERD_SHIM_LOG"
# How long a shim process whose last container went away waits for another one.
LINGER_S = 2.0


@dataclass(frozen=True, slots=True)
class ShimConfig:
    namespace: str
    id: str
    bundle: str
    grpc_address: str
    ttrpc_address: str
    socket_address: str
    debug: bool = False


def _close_fds(keep: set[int]) -> None:
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2 and fd not in keep:
            with contextlib.suppress(OSError):
                os.close(fd)


def _setup_stdio(bundle: str, debug: bool) -> None:
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    err = null
    with contextlib.suppress(OSError):
        # containerd opens <bundle>/log for reading; no reader → ENXIO → no log.
        err = os.open(os.path.join(bundle, "log"), os.O_WRONLY | os.O_NONBLOCK)
    log_file = os.environ.get(LOG_FILE_ENV)
    if err == null and log_file:  # for debugging: append to a file instead
        with contextlib.suppress(OSError):
            err = os.open(log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.dup2(err, 2)
    for fd in {null, err}:
        if fd > 2:
            os.close(fd)
    sys.stdin = open(0, closefd=False)  # noqa: SIM115
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
    sys.stderr = open(2, "w", closefd=False, buffering=1)  # noqa: SIM115
    logging.raiseExceptions = False  # a full log FIFO must never break the shim
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO,
        format="%(asctime)s %(levelname)s shim[%(process)d] %(name)s: %(message)s",
        force=True,
    )


class Host:
    """The shim process: serves one or more shim sockets ("endpoints") on one loop.

    Each endpoint is a complete shim for its container group — its own socket, Task
    service, namespace and event publisher — sharing the process's reaper. The zygote may
    hand a running host more endpoints over ``channel`` (datagrams as in
    ``pycontainerd.shim.zygote``) until it holds ``max_endpoints``; the process exits when
    its last endpoint is shut down.
    """

    def __init__(self, channel: socket.socket | None, max_endpoints: int) -> None:
        self.channel = channel
        self.max_endpoints = max(1, max_endpoints)
        self.reaper = Reaper()
        self.endpoints: dict[str, asyncio.Task[None]] = {}
        self.closing = False
        self._done = asyncio.Event()

    async def run(self, first: tuple[ShimConfig, socket.socket] | None) -> None:
        """Serve ``first``, or — a spare — wait for the first endpoint on the channel."""
        self.reaper.start()
        if first is not None:
            self.add(*first)
        else:
            # Warm up what the first Create uses, before anyone waits for it.
            await asyncio.to_thread(int)
        if self.channel is not None:
            self.channel.setblocking(False)
            asyncio.get_running_loop().add_reader(self.channel.fileno(), self._on_channel)
        elif first is None:
            return
        await self._done.wait()
        self.reaper.close()

    def _become(self, req: dict[str, Any], cfg: ShimConfig) -> None:
        """A spare's first endpoint: take on its environment, directory and log."""
        env = req.get("env")
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        self.max_endpoints = max(1, int(req.get("max_per_process") or 1))
        with contextlib.suppress(OSError):
            os.chdir(cfg.bundle)
        _setup_stdio(cfg.bundle, cfg.debug)

    def add(self, cfg: ShimConfig, sock: socket.socket) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(cfg, sock))
        self.endpoints[cfg.socket_address] = task

    def _on_channel(self) -> None:
        assert self.channel is not None
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.channel, 1 << 20, 4)
        except BlockingIOError:
            return
        except OSError:
            msg, fds = b"", []
        if not msg:  # the zygote is gone: keep serving what we have
            asyncio.get_running_loop().remove_reader(self.channel.fileno())
            self.channel.close()
            self.channel = None
            if not self.endpoints:  # an unused spare has nothing left to do
                self.closing = True
                self._done.set()
            return
        for extra in fds[1:]:
            os.close(extra)
        full = (
            self.closing
            or (self.endpoints and len(self.endpoints) >= self.max_endpoints)
            or not fds
        )
        try:
            if full:
                if fds:
                    os.close(fds[0])
                reply: dict[str, object] = {"full": True}
            else:
                req = json.loads(msg)
                cfg = ShimConfig(**req["config"])
                if not self.endpoints:
                    self._become(req, cfg)
                self.add(cfg, socket.socket(fileno=fds[0]))
                reply = {"pid": os.getpid()}
        except (ValueError, KeyError, TypeError) as exc:
            reply = {"error": f"bad request: {exc}"}
        with contextlib.suppress(OSError):
            self.channel.send(json.dumps(reply).encode())

    async def _serve(self, cfg: ShimConfig, sock: socket.socket) -> None:
        try:
            await serve(cfg, sock, self.reaper)
        except Exception:
            log.exception("shim endpoint %s failed", cfg.socket_address)
        finally:
            self.endpoints.pop(cfg.socket_address, None)
            if not self.endpoints:
                if self.channel is None:
                    self._exit_if_idle()
                else:
                    # Stay a little for the next container (sequential runs then skip the
                    # fork and warm-up of a new process); gone if none comes.
                    asyncio.get_running_loop().call_later(LINGER_S, self._exit_if_idle)

    def _exit_if_idle(self) -> None:
        if not self.endpoints and not self.closing:
            self.closing = True
            self._done.set()


async def serve(cfg: ShimConfig, sock: socket.socket, reaper: Reaper) -> None:
    """Serve one shim socket until Shutdown (with no containers left)."""
    publisher = Publisher(cfg.ttrpc_address, cfg.namespace)
    stop = asyncio.Event()
    service = TaskService(
        namespace=cfg.namespace,
        runc_root=address.runc_root(cfg.grpc_address),
        reaper=reaper,
        publisher=publisher,
        on_shutdown=stop.set,
    )
    server = Server()
    service.register(server)
    await server.serve_socket(sock)
    log.debug("serving %s for %s/%s", cfg.socket_address, cfg.namespace, cfg.id)
    await stop.wait()
    address.remove_socket(cfg.socket_address)
    await publisher.flush()
    await server.close()
    await service.close()
    await publisher.close()


def _limit_malloc_arenas() -> None:
    """One malloc arena: worker threads would each dirty an arena of their own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 1)  # M_ARENA_MAX


def run_detached(
    cfg: ShimConfig,
    sock: socket.socket,
    env: Mapping[str, str] | None,
    channel: socket.socket | None = None,
    max_endpoints: int = 1,
) -> NoReturn:
    """Become the shim process in this (already detached) process; never returns."""
    code = 0
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        os.chdir(cfg.bundle)
        keep = {sock.fileno()} | ({channel.fileno()} if channel is not None else set())
        _close_fds(keep)
        _setup_stdio(cfg.bundle, cfg.debug)
        set_subreaper()
        _limit_malloc_arenas()
        gc.enable()
        asyncio.run(Host(channel, max_endpoints).run((cfg, sock)))
    except BaseException:
        log.exception("shim server failed")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)


def run_spare(channel: socket.socket) -> NoReturn:
    """Become an idle shim process that waits for its first endpoint; never returns."""
    code = 0
    try:
        _close_fds({channel.fileno()})
        _setup_stdio("/", False)
        set_subreaper()
        _limit_malloc_arenas()
        gc.enable()
        asyncio.run(Host(channel, 1).run(None))
    except BaseException:
        log.exception("shim server failed")
        code = 1
    finally:
        logging.shutdown()
        os._exit(code)
