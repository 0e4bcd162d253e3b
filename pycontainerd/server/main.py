"""Daemon boot: directories, socket, plugins, the gRPC server, signals and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TYPE_CHECKING, cast

from pycontainerd.errdefs import FailedPrecondition, InvalidArgument
from pycontainerd.grpc import GRPCService
from pycontainerd.grpc.interceptors import wrap_handler
from pycontainerd.grpc.transport import Server
from pycontainerd.plugin import PluginSet
from pycontainerd.server.memory import tune_malloc
from pycontainerd.server.plugins import build_registry, close_plugins, load_plugins

if TYPE_CHECKING:
    import grpc.aio

    from pycontainerd.config import Config

log = logging.getLogger(__name__)

MAX_UNIX_PATH = 104


class AddressInUse(FailedPrecondition):
    """Another daemon answers on the configured socket."""


def _prepare_dirs(cfg: Config) -> None:
    root, state = Path(cfg.root), Path(cfg.state)
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)  # CVE-2024-25621: the root holds unpacked images and setuid files
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o711)


def _claim_socket(address: str) -> IO[bytes]:
    """Make ``address`` ours: refuse a live daemon, replace a stale socket file.

    A lock file beside the socket closes the race of two daemons starting at once.
    """
    if len(address) > MAX_UNIX_PATH:
        raise InvalidArgument(f"socket path {address!r} is longer than {MAX_UNIX_PATH} bytes")
    path = Path(address)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o711)
    lock = open(str(path) + ".lock", "wb")  # noqa: SIM115 - held for the daemon's lifetime
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        lock.close()
        raise AddressInUse(f"another daemon holds {address}") from exc
    if path.exists() or path.is_symlink():
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(address)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                lock.close()
                raise
            path.unlink(missing_ok=True)
            log.info("removed stale socket %s", address)
        else:
            lock.close()
            raise AddressInUse(f"a daemon is already serving on {address}")
        finally:
            probe.close()
    return lock


def _server(cfg: Config) -> Server:
    return Server(
        wrap=wrap_handler,
        max_receive_message_length=cfg.grpc.max_recv_message_size,
        max_send_message_length=cfg.grpc.max_send_message_size,
    )


def _tcp_tls(cfg: Config) -> ssl.SSLContext | None:
    """TLS for the TCP listener; a CA makes client certificates mandatory (mTLS)."""
    g = cfg.grpc
    if not g.tcp_tls_cert:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(g.tcp_tls_cert, g.tcp_tls_key or None)
    if g.tcp_tls_ca:
        ctx.load_verify_locations(g.tcp_tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _remove_socket(address: str) -> None:
    with contextlib.suppress(OSError):
        Path(address).unlink()


class Daemon:
    """One running daemon: its plugins and gRPC server."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.plugins = PluginSet()
        self.server: Server | None = None
        self._lock: IO[bytes] | None = None
        self._stopping = asyncio.Event()

    async def start(self) -> None:
        cfg = self.cfg
        loop = asyncio.get_running_loop()
        # Bounded default executor: to_thread hops share it (file I/O, hashing, mounts).
        loop.set_default_executor(ThreadPoolExecutor(max_workers=32, thread_name_prefix="pycd-io"))
        _prepare_dirs(cfg)
        self._lock = _claim_socket(cfg.grpc.address)
        registry = build_registry(cfg)
        self.plugins = await load_plugins(
            registry, cfg, address=cfg.grpc.address, ttrpc_address=cfg.ttrpc_address
        )
        server = _server(cfg)
        for p in self.plugins:
            if p.ok and isinstance(p.instance, GRPCService):
                # Our Server has grpc.aio.Server's registration API (see grpc/transport.py).
                p.instance.register(cast("grpc.aio.Server", server))
        server.add_insecure_port("unix:" + cfg.grpc.address)
        if cfg.grpc.tcp_address:
            tls = _tcp_tls(cfg)
            if tls is None:
                server.add_insecure_port(cfg.grpc.tcp_address)
            else:
                server.add_secure_port(cfg.grpc.tcp_address, tls)
        await server.start()
        os.chmod(cfg.grpc.address, 0o660)
        if (cfg.grpc.uid, cfg.grpc.gid) != (os.getuid(), os.getgid()):
            os.chown(cfg.grpc.address, cfg.grpc.uid, cfg.grpc.gid)
        self.server = server
        ok = sum(1 for p in self.plugins if p.ok)
        log.info("serving on %s (%d of %d plugins loaded)", cfg.grpc.address, ok, len(self.plugins))

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait(self) -> None:
        await self._stopping.wait()

    async def stop(self, grace: float = 2.0) -> None:
        log.info("stopping")
        for p in self.plugins:
            if p.ok and hasattr(p.instance, "set_serving"):
                p.instance.set_serving(False)
        if self.server is not None:
            await self.server.stop(grace)
        await close_plugins(self.plugins)
        if self._lock is not None:
            # Only the daemon that claimed the address may remove its socket.
            await asyncio.to_thread(_remove_socket, self.cfg.grpc.address)
        if self._lock is not None:
            self._lock.close()
        log.info("stopped")


async def run(cfg: Config) -> int:
    daemon = Daemon(cfg)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, daemon.request_stop)
    try:
        await daemon.start()
    except BaseException:
        await daemon.stop(grace=0)
        raise
    await daemon.wait()
    await daemon.stop()
    return 0


def serve(cfg: Config) -> int:
    if not tune_malloc():
        log.debug("malloc settings left as they are")
    return asyncio.run(run(cfg))
