"""The task manager (``io.containerd.runtime.v2.task``): one shim per task, found again
after a restart.

Create lays out the bundle, starts the shim for the container's runtime and asks it to
create the task; any failure on the way tears down what was made. A shim whose
connection drops while its task is registered is dead: the manager runs the shim's
``delete`` command (unmount, ``runc delete``), publishes ``/tasks/exit`` (status from
the shim, or 255) and ``/tasks/delete``, and forgets the task — so ``Tasks.Get`` answers
NotFound, as containerd's ``cleanupAfterDeadShim`` does.

On start-up ``load`` walks the bundles: a live shim is reconnected (its containers never
stopped); a dead one is cleaned up the same way; a bundle whose container no longer
exists in the metadata is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from google.protobuf import empty_pb2, timestamp_pb2

from pycontainerd.api.events import task_pb2 as ev
from pycontainerd.api.runtime.task.v2 import shim_pb2
from pycontainerd.errdefs import AlreadyExists, NotFound, PycdError
from pycontainerd.events import topics
from pycontainerd.tasks import bundle as bundlemod
from pycontainerd.tasks.bundle import Bundle
from pycontainerd.tasks.shim import Shim, find_binary, run_delete, run_start
from pycontainerd.tasks.shimlog import ShimLog

if TYPE_CHECKING:
    from pathlib import Path

    from pycontainerd.events import Publisher

log = logging.getLogger(__name__)

# (bundle, runtime name, serialized runtime options) → the started shim's address
ShimStarter = Callable[[Bundle, str, bytes], Awaitable[str]]


@dataclass(slots=True)
class Task:
    namespace: str
    id: str
    bundle: Bundle
    shim: Shim
    runtime: str
    pid: int = 0
    deleting: bool = False
    log: ShimLog | None = None


class TaskManager:
    def __init__(
        self,
        root: Path,
        state: Path,
        *,
        grpc_address: str,
        ttrpc_address: str,
        publisher: Publisher,
        publish_binary: str,
        runtimes: dict[str, str] | None = None,
        starters: dict[str, ShimStarter] | None = None,
    ) -> None:
        self.root = root
        self.state = state
        self._grpc = grpc_address
        self._ttrpc = ttrpc_address
        self._publisher = publisher
        self._publish_binary = publish_binary
        self._runtimes = dict(runtimes or {})
        # In-process ways to start a runtime's shim (our own shim's pre-forked launcher).
        self._starters = dict(starters or {})
        self._tasks: dict[tuple[str, str], Task] = {}
        self._creating: set[tuple[str, str]] = set()
        root.mkdir(parents=True, exist_ok=True, mode=0o711)
        state.mkdir(parents=True, exist_ok=True, mode=0o711)

    # -- lookup ----------------------------------------------------------------------

    def get(self, ns: str, id_: str) -> Task:
        task = self._tasks.get((ns, id_))
        if task is None or task.deleting:
            raise NotFound(f"task {id_}")
        return task

    def in_namespace(self, ns: str) -> list[Task]:
        return [t for (n, _), t in sorted(self._tasks.items()) if n == ns and not t.deleting]

    def all(self) -> list[Task]:
        return list(self._tasks.values())

    # -- create / delete -------------------------------------------------------------

    async def create(
        self,
        ns: str,
        id_: str,
        *,
        spec: bytes,
        runtime: str,
        options: bytes,
        request: shim_pb2.CreateTaskRequest,
    ) -> tuple[Task, int]:
        key = (ns, id_)
        if key in self._tasks or key in self._creating:
            raise AlreadyExists(f"task {id_}")
        self._creating.add(key)
        try:
            return await self._create(ns, id_, spec, runtime, options, request)
        finally:
            self._creating.discard(key)

    async def _create(
        self,
        ns: str,
        id_: str,
        spec: bytes,
        runtime: str,
        options: bytes,
        request: shim_pb2.CreateTaskRequest,
    ) -> tuple[Task, int]:
        starter = self._starters.get(runtime)
        # Even a shim started in-process needs its binary: ``delete`` cleans up after it.
        try:
            binary = find_binary(runtime, self._runtimes)
        except PycdError:
            if starter is None:
                raise
            binary = ""
        b = await asyncio.to_thread(bundlemod.create, self.root, self.state, ns, id_, spec)
        shim: Shim | None = None
        shimlog: ShimLog | None = None
        try:
            shimlog = ShimLog(b.path / "log", f"{ns}/{id_}")
            if starter is not None:
                address = await starter(b, runtime, options)
            else:
                address = await run_start(
                    binary, b, self._grpc, self._ttrpc, self._publish_binary, options
                )
            await asyncio.to_thread(b.write, "shim-binary-path", binary)
            shim = await Shim.connect(b, binary, address)
            request.id = id_
            request.bundle = str(b.path)
            resp = await shim.call("Create", request, shim_pb2.CreateTaskResponse)
        except BaseException:
            await self._teardown(b, shim, binary)
            if shimlog is not None:
                shimlog.close()
            raise
        task = Task(ns, id_, b, shim, runtime, resp.pid, log=shimlog)
        self._tasks[(ns, id_)] = task
        shim.client.on_close(lambda: self._on_shim_lost(task))
        return task, resp.pid

    async def _teardown(self, b: Bundle, shim: Shim | None, binary: str) -> None:
        """Undo a failed create: stop the shim (if any) and remove the bundle."""
        if shim is not None:
            with contextlib.suppress(PycdError, OSError):
                await shim.call(
                    "Delete", shim_pb2.DeleteRequest(id=b.id), shim_pb2.DeleteResponse, timeout_s=10
                )
            with contextlib.suppress(PycdError, OSError):
                await shim.call(
                    "Shutdown",
                    shim_pb2.ShutdownRequest(id=b.id, now=True),
                    empty_pb2.Empty,
                    timeout_s=5,
                )
            await shim.close()
        elif binary and b.path.joinpath("address").exists():
            with contextlib.suppress(PycdError, OSError):
                await run_delete(binary, b, self._grpc, self._ttrpc, self._publish_binary)
        await asyncio.to_thread(b.delete)

    async def delete(self, task: Task) -> shim_pb2.DeleteResponse:
        """Delete the init process, stop the shim and remove the bundle."""
        resp = await task.shim.call(
            "Delete", shim_pb2.DeleteRequest(id=task.id), shim_pb2.DeleteResponse
        )
        # From here the connection may drop any moment: that is the shim going away, not dying.
        task.deleting = True
        self._tasks.pop((task.namespace, task.id), None)
        with contextlib.suppress(PycdError, OSError):
            await task.shim.call(
                "Shutdown", shim_pb2.ShutdownRequest(id=task.id), empty_pb2.Empty, timeout_s=5
            )
        await task.shim.close()
        if task.log is not None:
            task.log.close()
        await asyncio.to_thread(task.bundle.delete)
        return resp

    # -- dead shims and restarts -----------------------------------------------------

    def _on_shim_lost(self, task: Task) -> None:
        if task.deleting or self._tasks.get((task.namespace, task.id)) is not task:
            return
        log.info("shim of task %s/%s disconnected", task.namespace, task.id)
        task.deleting = True
        self._tasks.pop((task.namespace, task.id), None)
        if task.log is not None:
            task.log.close()
        asyncio.get_running_loop().create_task(
            self._cleanup_dead(task.bundle, task.shim.binary, task.pid)
        )

    async def _cleanup_dead(self, b: Bundle, binary: str, pid: int) -> None:
        exit_status, exited_at = 255, timestamp_pb2.Timestamp()
        exited_at.FromNanoseconds(time.time_ns())
        try:
            resp = await run_delete(binary, b, self._grpc, self._ttrpc, self._publish_binary)
            exit_status = resp.exit_status
            if resp.HasField("exited_at"):
                exited_at = resp.exited_at
            pid = resp.pid or pid
        except (PycdError, OSError) as exc:
            log.warning("cleanup of dead shim for %s/%s: %s", b.namespace, b.id, exc)
        ns = b.namespace
        self._publisher.publish(
            topics.TASK_EXIT,
            ev.TaskExit(
                container_id=b.id, id=b.id, pid=pid, exit_status=exit_status, exited_at=exited_at
            ),
            ns,
        )
        self._publisher.publish(
            topics.TASK_DELETE,
            ev.TaskDelete(container_id=b.id, pid=pid, exit_status=exit_status, exited_at=exited_at),
            ns,
        )
        await asyncio.to_thread(b.delete)

    async def load(self, container_exists: Callable[[str, str], Awaitable[bool]]) -> None:
        """Reconnect to the shims of the bundles on disk; clean up what cannot be."""
        bundles = await asyncio.to_thread(bundlemod.existing, self.root, self.state)
        await asyncio.gather(*(self._load_one(b, container_exists) for b in bundles))

    async def _load_one(
        self, b: Bundle, container_exists: Callable[[str, str], Awaitable[bool]]
    ) -> None:
        try:
            binary = await asyncio.to_thread(b.read, "shim-binary-path")
        except OSError:
            binary = ""
        try:
            address = await asyncio.to_thread(b.read, "address")
        except OSError:
            address = ""
        if not await container_exists(b.namespace, b.id):
            log.info("removing bundle %s/%s: its container is gone", b.namespace, b.id)
            if address and binary:
                with contextlib.suppress(PycdError, OSError):
                    await run_delete(binary, b, self._grpc, self._ttrpc, self._publish_binary)
            await asyncio.to_thread(b.delete)
            return
        try:
            shim = await Shim.connect(b, binary, address)
            state = await shim.call(
                "State", shim_pb2.StateRequest(id=b.id), shim_pb2.StateResponse, timeout_s=5
            )
        except (PycdError, OSError) as exc:
            log.info("shim of %s/%s is gone (%s): cleaning up", b.namespace, b.id, exc)
            if binary:
                await self._cleanup_dead(b, binary, 0)
            else:
                await asyncio.to_thread(b.delete)
            return
        shimlog = None
        with contextlib.suppress(OSError):
            shimlog = ShimLog(b.path / "log", f"{b.namespace}/{b.id}")
        task = Task(b.namespace, b.id, b, shim, binary, state.pid, log=shimlog)
        self._tasks[(b.namespace, b.id)] = task
        shim.client.on_close(lambda: self._on_shim_lost(task))
        log.info("reconnected to task %s/%s (pid %d)", b.namespace, b.id, state.pid)

    async def close(self) -> None:
        """Disconnect from the shims; they and their containers keep running."""
        for task in list(self._tasks.values()):
            task.deleting = True
            await task.shim.close()
            if task.log is not None:
                task.log.close()
        self._tasks.clear()
