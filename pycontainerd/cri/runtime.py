"""The CRI plugin's core: its connection to the daemon, pod and container state, exits.

``CRIRuntime`` talks to the daemon it lives in through the SDK (``pycontainerd.client``)
on the daemon's own socket, in namespace ``k8s.io``, and wires pods with a
``NetworkManager``. Task exits arrive from the daemon's event exchange, subscribed
in-process at init (so none is missed while the server comes up); the handler records a
container's exit (code, time, reason ``Completed``/``Error``/``OOMKilled``) and deletes its
task, or marks a sandbox not ready. ``start()`` recovers the state from the container
records and live tasks once the server answers (see ``store``) and reclaims the pod
directories (and their ``/dev/shm`` mounts), network namespaces and IPs no known pod
owns; requests wait for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from pycontainerd import typeurl
from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.api.events import task_pb2 as events_task_pb2
from pycontainerd.api.services.containers.v1 import containers_pb2
from pycontainerd.api.services.tasks.v1 import tasks_pb2
from pycontainerd.api.types.task import task_pb2
from pycontainerd.client import Client
from pycontainerd.client.images import Image, snapshot_exists, unpack
from pycontainerd.cri import logserver
from pycontainerd.cri.images import ImageCatalog
from pycontainerd.cri.spec import OomPolicy
from pycontainerd.cri.store import (
    CONTAINER_KIND,
    EXT_KEY,
    KIND_LABEL,
    SANDBOX_KIND,
    ContainerMeta,
    ContainerStatus,
    NameIndex,
    SandboxMeta,
    StatusStore,
    reclaim_sandbox_dirs,
)
from pycontainerd.errdefs import NotFound, PycdError, Unavailable

if TYPE_CHECKING:
    from collections.abc import Coroutine
    from pathlib import Path

    import grpc.aio

    from pycontainerd.cri.options import CRIConfig
    from pycontainerd.events.exchange import Exchange
    from pycontainerd.network import NetworkManager

__all__ = ["CRIContainer", "CRIRuntime", "ContainerEvent", "EventQueue", "Sandbox"]

# What the plugin follows on the exchange: exits and OOMs of tasks, and image changes
# (which invalidate the image catalog's listing).
_TOPICS = (
    'topic=="/tasks/exit"',
    'topic=="/tasks/oom"',
    'topic=="/images/create"',
    'topic=="/images/update"',
    'topic=="/images/delete"',
)

T = TypeVar("T")

log = logging.getLogger(__name__)

NAMESPACE = "k8s.io"
UNKNOWN_EXIT_CODE = 255
# Container events a GetContainerEvents stream may have pending before it is cut off.
EVENT_BACKLOG = 1024
# The log writers' fork server, under the plugin's state dir. It outlives the daemon (as
# the writers do) and exits by itself once idle; see ``logserver``.
LOG_SERVER_SOCKET = "logsrv.sock"
# Set to 0 to spawn one interpreter per log writer instead of using the log server.
ENV_LOG_SERVER = "PYCONTAINERD_CRI_LOG_SERVER"


@dataclass(frozen=True, slots=True)
class ContainerEvent:
    """A lifecycle change of a container or sandbox (``id_ == sandbox_id``)."""

    id_: str
    sandbox_id: str
    kind: api_pb2.ContainerEventType.ValueType
    at: int


# None: the subscriber fell behind and its events were dropped.
EventQueue = asyncio.Queue[ContainerEvent | None]


@dataclass(slots=True)
class Sandbox:
    meta: SandboxMeta
    pid: int = 0
    ready: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(slots=True)
class CRIContainer:
    meta: ContainerMeta
    status: ContainerStatus
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def now_ns() -> int:
    return time.time_ns()


class CRIRuntime:
    def __init__(
        self,
        cfg: CRIConfig,
        *,
        address: str,
        root: Path,
        state: Path,
        exchange: Exchange,
        network: NetworkManager,
        channel: grpc.aio.Channel | None = None,
    ) -> None:
        self.cfg = cfg
        # In the daemon: an in-process channel (grpc.local), not a socket round trip.
        self.client = Client(address, NAMESPACE, channel=channel)
        self.root = root
        self.state = state
        self.network = network
        self.statuses = StatusStore(root / "containers")
        self.sandbox_dirs = state / "sandboxes"
        self.names = NameIndex()
        self.sandboxes: dict[str, Sandbox] = {}
        self.containers: dict[str, CRIContainer] = {}
        self.images = ImageCatalog(self.client, cfg.snapshotter, cfg.insecure_registries)
        self.oom = OomPolicy.probe(cfg.restrict_oom_score_adj)
        self._exchange = exchange
        self._ready = asyncio.Event()
        self._failed: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Image target digest -> top chain ID in our snapshotter, once unpacked.
        self._chains: dict[str, str] = {}
        # Writers spawned by the daemon itself (log server fallback), until reaped.
        self._log_writers: set[asyncio.subprocess.Process] = set()
        self._event_queues: set[EventQueue] = set()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Subscribe to task events now; recover once the daemon's server answers."""
        self.spawn(self._run(self._exchange.subscribe(_TOPICS)))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, sub: object) -> None:
        from pycontainerd.events.exchange import Subscription

        assert isinstance(sub, Subscription)
        try:
            await self.client.wait_ready(within=120)
            await self.recover()
        except Exception as exc:
            log.exception("CRI state recovery failed")
            self._failed = exc
            sub.close()
            return
        finally:
            self._ready.set()
        while True:
            try:
                async for env in sub:
                    if env.namespace == NAMESPACE:
                        await self._on_event(env.topic, env.event)
                return
            except PycdError as exc:
                # Cut off for falling behind: resubscribe and look at every task again.
                log.warning("CRI event subscription lost (%s); resubscribing", exc)
                sub = self._exchange.subscribe(_TOPICS)
                self.images.invalidate()
                await self.reconcile()

    async def ready(self) -> None:
        await self._ready.wait()
        if self._failed is not None:
            raise Unavailable(f"CRI plugin failed to recover its state: {self._failed}")

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

    # ------------------------------------------------------------------ container events

    def subscribe_events(self) -> EventQueue:
        """A queue of the container events from now on (GetContainerEvents)."""
        q: EventQueue = asyncio.Queue(EVENT_BACKLOG)
        self._event_queues.add(q)
        return q

    def unsubscribe_events(self, q: EventQueue) -> None:
        self._event_queues.discard(q)

    def emit(self, id_: str, sandbox_id: str, kind: api_pb2.ContainerEventType.ValueType) -> None:
        """Queue an event for every subscriber; never blocks. A subscriber whose backlog
        is full loses it and gets None instead, then nothing more: its stream ends with
        an error and kubelet relists, rather than the daemon buffering without bound."""
        ev = ContainerEvent(id_, sandbox_id, kind, now_ns())
        for q in list(self._event_queues):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:
                self._event_queues.discard(q)
                while not q.empty():
                    q.get_nowait()
                q.put_nowait(None)

    # ------------------------------------------------------------------ lookups

    def sandbox(self, id_: str) -> Sandbox:
        return self._lookup(self.sandboxes, id_, "sandbox")

    def container(self, id_: str) -> CRIContainer:
        return self._lookup(self.containers, id_, "container")

    @staticmethod
    def _lookup(table: dict[str, T], id_: str, what: str) -> T:
        """By id or a unique id prefix, as containerd's truncindex does."""
        if not id_:
            raise NotFound(f"{what} id is empty")
        hit = table.get(id_)
        if hit is not None:
            return hit
        matches = [v for k, v in table.items() if k.startswith(id_)]
        if len(matches) == 1:
            return matches[0]
        raise NotFound(f"{what} {id_!r}")

    # ------------------------------------------------------------------ exits

    async def _on_event(self, topic: str, any_msg: object) -> None:
        if topic.startswith("/images/"):
            self.images.invalidate()  # whoever changed them: ctr, pcd, our own pulls
            return
        try:
            msg = typeurl.unpack(any_msg)  # type: ignore[arg-type]
        except PycdError:
            return
        if isinstance(msg, events_task_pb2.TaskOOM):
            c = self.containers.get(msg.container_id)
            if c is not None:
                c.status.oom = True
            return
        if isinstance(msg, events_task_pb2.TaskExit) and msg.id == msg.container_id:
            at = msg.exited_at.seconds * 1_000_000_000 + msg.exited_at.nanos
            await self.handle_exit(msg.container_id, msg.exit_status, at or now_ns())

    async def handle_exit(self, id_: str, code: int, at: int) -> None:
        """Record the exit of a container's or sandbox's init process; delete its task."""
        c = self.containers.get(id_)
        if c is not None:
            async with c.lock:
                await self.finish(c, code, at)
            return
        sb = self.sandboxes.get(id_)
        if sb is not None:
            async with sb.lock:
                if sb.ready:
                    self.emit(id_, id_, api_pb2.CONTAINER_STOPPED_EVENT)
                sb.ready = False
                await self.delete_task(id_)

    async def finish(self, c: CRIContainer, code: int, at: int, reason: str = "") -> None:
        """Mark ``c`` exited (caller holds ``c.lock``); idempotent."""
        st = c.status
        if st.finished_at:
            return
        st.finished_at = at
        st.exit_code = code
        st.reason = reason or ("OOMKilled" if st.oom else "Completed" if code == 0 else "Error")
        await self.delete_task(c.meta.id)
        await asyncio.to_thread(self.statuses.save, c.meta.id, st)
        c.exited.set()
        self.emit(c.meta.id, c.meta.sandbox_id, api_pb2.CONTAINER_STOPPED_EVENT)

    async def delete_task(self, id_: str) -> None:
        with contextlib.suppress(NotFound):
            await self.client.call(
                self.client.tasks_stub.Delete, tasks_pb2.DeleteTaskRequest(container_id=id_)
            )

    # ------------------------------------------------------------------ recovery

    async def _tasks_by_id(self) -> dict[str, task_pb2.Process]:
        resp = await self.client.call(self.client.tasks_stub.List, tasks_pb2.ListTasksRequest())
        return {t.id: t for t in resp.tasks}

    async def recover(self) -> None:
        resp = await self.client.call(
            self.client.containers_stub.List, containers_pb2.ListContainersRequest()
        )
        for rec in resp.containers:
            kind = rec.labels.get(KIND_LABEL)
            ext = rec.extensions.get(EXT_KEY)
            if kind not in (SANDBOX_KIND, CONTAINER_KIND) or ext is None:
                continue
            try:
                if kind == SANDBOX_KIND:
                    meta = SandboxMeta.from_json(ext.value)
                    self.sandboxes[meta.id] = Sandbox(meta)
                    self.names.reserve(meta.name, meta.id)
                else:
                    cmeta = ContainerMeta.from_json(ext.value)
                    status = await asyncio.to_thread(self.statuses.load, cmeta.id)
                    self.containers[cmeta.id] = CRIContainer(cmeta, status)
                    self.names.reserve(cmeta.name, cmeta.id)
            except (PycdError, TypeError, KeyError) as exc:
                log.warning("CRI record %s is unreadable, ignored: %s", rec.id, exc)
        await self.reconcile()
        gone = await asyncio.to_thread(reclaim_sandbox_dirs, self.sandbox_dirs, set(self.sandboxes))
        if gone:
            log.info("removed the files and /dev/shm mounts of unknown pods: %s", gone)
        report = await self.network.reclaim(self._live_sandboxes)
        if report.attachments or report.netns or report.leases:
            log.info("reclaimed leaked pod networking: %s", report)
        log.info(
            "CRI state recovered: %d sandboxes, %d containers",
            len(self.sandboxes),
            len(self.containers),
        )

    async def _live_sandboxes(self) -> list[str]:
        return list(self.sandboxes)

    async def reconcile(self) -> None:
        """Bring every known sandbox and container in line with the live tasks."""
        tasks = await self._tasks_by_id()
        for sb in self.sandboxes.values():
            t = tasks.get(sb.meta.id)
            async with sb.lock:
                sb.ready = t is not None and t.status == task_pb2.RUNNING
                sb.pid = t.pid if t is not None else 0
                if t is not None and t.status == task_pb2.STOPPED:
                    await self.delete_task(sb.meta.id)
        for c in self.containers.values():
            t = tasks.get(c.meta.id)
            async with c.lock:
                st = c.status
                if st.finished_at:
                    c.exited.set()
                    if t is not None:
                        await self.delete_task(c.meta.id)
                elif st.started_at:
                    if t is None:
                        await self.finish(c, UNKNOWN_EXIT_CODE, now_ns(), "Unknown")
                    elif t.status == task_pb2.STOPPED:
                        at = t.exited_at.seconds * 1_000_000_000 + t.exited_at.nanos
                        await self.finish(c, t.exit_status, at or now_ns())
                    else:
                        st.pid = t.pid
                elif t is not None:
                    # Died between task create and start: the start never happened.
                    with contextlib.suppress(PycdError):
                        await self.client.call(
                            self.client.tasks_stub.Kill,
                            tasks_pb2.KillRequest(container_id=c.meta.id, signal=9, all=True),
                        )
                    await self.delete_task(c.meta.id)

    # ------------------------------------------------------------------ images

    async def image_chain(self, img: Image) -> str:
        """``img`` unpacked in the CRI's snapshotter; its top chain ID.

        The first call unpacks (and labels the layers); later ones only check that the
        top snapshot still exists: an image's layers never change, and every pod start
        otherwise re-read its manifest and config and rewrote the same labels.
        """
        snap = self.cfg.snapshotter
        chain = self._chains.get(img.target.digest)
        if chain is not None and await snapshot_exists(self.client, snap, chain):
            return chain
        # First use, or the snapshots were collected since: unpack (again).
        chain = await unpack(self.client, self.client.images, img, snap)
        self._chains[img.target.digest] = chain
        return chain

    # ------------------------------------------------------------------ log writers

    async def start_log_writer(self, c: CRIContainer, stdout: str, stderr: str) -> int:
        """Start the detached log writer for ``c``'s FIFOs; its pid.

        The read ends are opened here, before the task exists, and handed to the writer:
        the shim's writer can then come and go at any time without output being lost.
        Normally the log server (``logserver``, started on first use under our state dir
        and reused across daemon restarts) forks the writer, so the daemon is not its
        parent; only when the server cannot be had is the writer spawned from here, and
        then reaped here (``_log_writers``). Either way a container gets its own writer.
        """
        fifos = [(name, p) for name, p in (("stdout", stdout), ("stderr", stderr)) if p]
        pid, fds = await asyncio.to_thread(self._start_log_writer_sync, c.meta.log_path, fifos)
        if pid:
            return pid
        try:
            args = [
                sys.executable, "-m", "pycontainerd.cri.logwriter", c.meta.log_path,
                str(self.cfg.max_container_log_line_size), *(str(fd) for fd in fds),
            ]  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
                start_new_session=True,
                pass_fds=fds,
            )
        finally:
            for fd in fds:
                os.close(fd)
        self._log_writers.add(proc)
        self.spawn(self._reap(proc))
        return proc.pid

    def _start_log_writer_sync(
        self, log_path: str, fifos: list[tuple[str, str]]
    ) -> tuple[int, list[int]]:
        """Open the read ends and have the log server fork a writer for them: ``(pid,
        [])``; or ``(0, fds)`` when the server could not be had (the caller spawns the
        writer and closes the fds)."""
        fds = _open_readers([p for _, p in fifos])
        sock = str(self.state / LOG_SERVER_SOCKET)
        if (
            os.environ.get(ENV_LOG_SERVER, "1") == "0"
            or len(os.fsencode(sock)) > logserver.MAX_SOCKET_PATH
        ):
            return 0, fds
        try:
            pid = logserver.spawn_writer(
                sock,
                log_path,
                self.cfg.max_container_log_line_size,
                [(name, fd) for (name, _), fd in zip(fifos, fds, strict=True)],
            )
        except (OSError, logserver.LogServerError) as exc:
            log.warning("CRI log server unavailable, spawning the log writer: %s", exc)
            return 0, fds
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        for fd in fds:
            os.close(fd)
        return pid, []

    async def _reap(self, proc: asyncio.subprocess.Process) -> None:
        try:
            await proc.wait()
        finally:
            self._log_writers.discard(proc)

    @staticmethod
    def signal_pid(pid: int, sig: int = signal.SIGUSR1) -> bool:
        if pid <= 0:
            return False
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return False
        return True


def _open_readers(paths: list[str]) -> list[int]:
    fds: list[int] = []
    try:
        for p in paths:
            fds.append(os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds
