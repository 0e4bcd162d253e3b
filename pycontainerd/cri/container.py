"""CRI containers: create, start, stop, remove, status, list, exec, update, reopen log.

A container is created in a ready sandbox from a local image (its own writable snapshot
and a spec from ``spec.container_spec``) and started later: StartContainer makes the log
FIFOs, spawns the container's log writer (``logwriter``) when kubelet gave a log path, then
creates and starts the task. A start that fails leaves the container exited with reason
``StartError``. StopContainer sends the image's stop signal, waits up to the timeout, then
SIGKILLs; the exit itself is recorded by ``CRIRuntime.finish`` whoever sees it first (the
event handler or the stopper's ``Tasks.Wait``). ExecSync runs a process in the container
with its output captured up to 16 MiB per stream and kills it at the timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import secrets
import signal
import time
from typing import TYPE_CHECKING

from google.protobuf import any_pb2, field_mask_pb2

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.api.services.containers.v1 import containers_pb2
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2
from pycontainerd.api.services.tasks.v1 import tasks_pb2
from pycontainerd.client import TaskIO
from pycontainerd.client.containers import _image_userdb
from pycontainerd.client.spec import SPEC_TYPE_URL
from pycontainerd.cri.runtime import CRIContainer, CRIRuntime, now_ns
from pycontainerd.cri.spec import container_spec, host_prep, resources_doc, wanted_user
from pycontainerd.cri.store import (
    CONTAINER_KIND,
    EXT_KEY,
    EXT_TYPE,
    KIND_LABEL,
    ContainerMeta,
    ContainerStatus,
    WireList,
    container_name,
    filter_matches,
)
from pycontainerd.errdefs import (
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PycdError,
)

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from pycontainerd.cri.images import ImageInfo
    from pycontainerd.grpc.transport import Wire

__all__ = ["MAX_EXEC_OUTPUT", "ContainerService"]

log = logging.getLogger(__name__)

MAX_EXEC_OUTPUT = 16 << 20
# Seconds ReopenContainerLog waits for the writer to create the new log file.
REOPEN_WAIT = 2.0
LINUX_RESOURCES_TYPE_URL = "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources"
START_ERROR_EXIT = 128
_STATE_NAMES: dict[api_pb2.ContainerState.ValueType, str] = {
    api_pb2.CONTAINER_CREATED: "created",
    api_pb2.CONTAINER_RUNNING: "running",
    api_pb2.CONTAINER_EXITED: "exited",
}


def _signal_number(name: str) -> int:
    try:
        return int(signal.Signals[name if name.startswith("SIG") else "SIG" + name])
    except KeyError:
        return int(name) if name.isdigit() else int(signal.SIGTERM)


class ContainerService:
    def __init__(self, rt: CRIRuntime) -> None:
        self.rt = rt
        self._wire = WireList()

    # ------------------------------------------------------------------ create

    async def create(self, sandbox_id: str, cfg: api_pb2.ContainerConfig) -> str:
        rt = self.rt
        await rt.ready()
        sb = rt.sandbox(sandbox_id)
        if not sb.ready:
            raise FailedPrecondition(f"sandbox {sb.meta.id} is not ready")
        if not cfg.metadata.name:
            raise InvalidArgument("container config must include metadata.name")
        if not cfg.image.image:
            raise InvalidArgument("container config must name an image")
        sb_cfg = sb.meta.config_pb()
        id_ = secrets.token_hex(32)
        name = container_name(cfg.metadata, sb_cfg.metadata)
        rt.names.reserve(name, id_)
        try:
            image = await rt.images.find(cfg.image.image)
            log_path = ""
            if cfg.log_path:
                log_path = os.path.join(sb_cfg.log_directory, cfg.log_path)
            meta = ContainerMeta(
                id=id_, name=name, sandbox_id=sb.meta.id, config=cfg.SerializeToString(),
                created_at=now_ns(), image_name=image.names[0], image_id=image.id,
                image_ref=image.ref, log_path=log_path,
                stop_signal=str(image.config.get("StopSignal") or "SIGTERM"),
            )  # fmt: skip
            await self._create_record(meta, cfg, sb_cfg, sb.pid, image)
        except BaseException:
            rt.names.release(name, id_)
            raise
        status = ContainerStatus()
        await asyncio.to_thread(rt.statuses.save, id_, status)
        rt.containers[id_] = CRIContainer(meta, status)
        rt.emit(id_, meta.sandbox_id, api_pb2.CONTAINER_CREATED_EVENT)
        return id_

    async def _create_record(
        self,
        meta: ContainerMeta,
        cfg: api_pb2.ContainerConfig,
        sb_cfg: api_pb2.PodSandboxConfig,
        sandbox_pid: int,
        image: ImageInfo,
    ) -> None:
        rt = self.rt
        c = rt.client
        snap = rt.cfg.snapshotter
        sc = cfg.linux.security_context
        target_pid = 0
        if sc.namespace_options.pid == api_pb2.TARGET:
            target = rt.container(sc.namespace_options.target_id)
            if target.status.state != api_pb2.CONTAINER_RUNNING:
                raise FailedPrecondition(f"target container {target.meta.id} is not running")
            target_pid = target.status.pid
        prep = await asyncio.to_thread(host_prep, cfg, seccomp_default=rt.cfg.seccomp_default)
        img = await c.get_image(meta.image_name)
        async with c.lease():
            chain = await rt.image_chain(img)
            user = wanted_user(sc, image.user)
            userdb = await _image_userdb(c, snap, chain) if user else None
            spec = container_spec(
                cfg, meta.id, sandbox_id=meta.sandbox_id, sandbox_cfg=sb_cfg,
                sandbox_pid=sandbox_pid, target_pid=target_pid,
                netns=rt.sandboxes[meta.sandbox_id].meta.netns,
                files_dir=str(rt.sandbox_dirs / meta.sandbox_id), image_name=meta.image_name,
                image_config=image.config, userdb=userdb, prep=prep, oom=rt.oom,
            )  # fmt: skip
            await c.call(
                c.snapshots_stub.Prepare,
                snapshots_pb2.PrepareSnapshotRequest(snapshotter=snap, key=meta.id, parent=chain),
            )
            record = containers_pb2.Container(
                id=meta.id,
                labels={**cfg.labels, KIND_LABEL: CONTAINER_KIND},
                image=meta.image_name,
                runtime=containers_pb2.Container.Runtime(name=rt.cfg.runtime),
                spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(spec).encode()),
                snapshotter=snap,
                snapshot_key=meta.id,
                extensions={EXT_KEY: any_pb2.Any(type_url=EXT_TYPE, value=meta.to_json())},
            )
            try:
                await c.call(
                    c.containers_stub.Create,
                    containers_pb2.CreateContainerRequest(container=record),
                )
            except BaseException:
                with contextlib.suppress(PycdError):
                    await c.call(
                        c.snapshots_stub.Remove,
                        snapshots_pb2.RemoveSnapshotRequest(snapshotter=snap, key=meta.id),
                    )
                raise

    # ------------------------------------------------------------------ start

    async def start(self, id_: str) -> None:
        rt = self.rt
        await rt.ready()
        c = rt.container(id_)
        async with c.lock:
            state = c.status.state
            if state != api_pb2.CONTAINER_CREATED:
                raise FailedPrecondition(
                    f"container {c.meta.id} is in {_STATE_NAMES.get(state, 'unknown')} state"
                )
            sb = rt.sandboxes.get(c.meta.sandbox_id)
            if sb is None or not sb.ready:
                raise FailedPrecondition(f"sandbox {c.meta.sandbox_id} is not ready")
            try:
                await self._start(c)
            except BaseException as exc:
                if rt.signal_pid(c.status.log_writer_pid, signal.SIGKILL):
                    c.status.log_writer_pid = 0
                await rt.finish(c, START_ERROR_EXIT, now_ns(), "StartError")
                c.status.message = str(exc)
                await asyncio.to_thread(rt.statuses.save, c.meta.id, c.status)
                raise

    async def _start(self, c: CRIContainer) -> None:
        rt = self.rt
        cl = rt.client
        tty = c.meta.config_pb().tty
        stdout = stderr = ""
        if c.meta.log_path:
            stdout, stderr = await asyncio.to_thread(_make_fifos, rt.statuses.dir(c.meta.id), tty)
            c.status.log_writer_pid = await rt.start_log_writer(c, stdout, stderr)
        container = await cl.load_container(c.meta.id)
        req = tasks_pb2.CreateTaskRequest(
            container_id=c.meta.id, rootfs=await container.rootfs(), terminal=tty,
            stdout=stdout, stderr=stderr,
        )  # fmt: skip
        await cl.call(cl.tasks_stub.Create, req)
        resp = await cl.call(cl.tasks_stub.Start, tasks_pb2.StartRequest(container_id=c.meta.id))
        c.status.pid = resp.pid
        c.status.started_at = now_ns()
        await asyncio.to_thread(rt.statuses.save, c.meta.id, c.status)
        rt.emit(c.meta.id, c.meta.sandbox_id, api_pb2.CONTAINER_STARTED_EVENT)

    # ------------------------------------------------------------------ stop / remove

    async def _kill(self, id_: str, sig: int) -> None:
        with contextlib.suppress(NotFound):
            await self.rt.client.call(
                self.rt.client.tasks_stub.Kill,
                tasks_pb2.KillRequest(container_id=id_, signal=sig, all=sig == signal.SIGKILL),
            )

    async def _wait_exit(self, c: CRIContainer) -> None:
        """Wait for the task to exit and record it (the event may come first: idempotent)."""
        cl = self.rt.client
        try:
            resp = await cl.call(cl.tasks_stub.Wait, tasks_pb2.WaitRequest(container_id=c.meta.id))
        except NotFound:
            await c.exited.wait()
            return
        at = resp.exited_at.seconds * 1_000_000_000 + resp.exited_at.nanos
        async with c.lock:
            await self.rt.finish(c, resp.exit_status, at or now_ns())

    async def stop(self, id_: str, grace: int) -> None:
        rt = self.rt
        await rt.ready()
        c = rt.container(id_)
        if c.status.state != api_pb2.CONTAINER_RUNNING:
            return
        if grace > 0:
            await self._kill(c.meta.id, _signal_number(c.meta.stop_signal))
            try:
                await asyncio.wait_for(self._wait_exit(c), grace)
                return
            except TimeoutError:
                log.info("container %s did not stop in %ss; killing it", c.meta.id, grace)
        await self._kill(c.meta.id, signal.SIGKILL)
        await self._wait_exit(c)

    async def remove(self, id_: str) -> None:
        rt = self.rt
        await rt.ready()
        try:
            c = rt.container(id_)
        except NotFound:
            return  # idempotent, as containerd's RemoveContainer is
        if c.status.state == api_pb2.CONTAINER_RUNNING:
            await self.stop(c.meta.id, 0)
        cl = rt.client
        async with c.lock:
            await rt.delete_task(c.meta.id)
            with contextlib.suppress(NotFound):
                await cl.call(
                    cl.containers_stub.Delete, containers_pb2.DeleteContainerRequest(id=c.meta.id)
                )
            with contextlib.suppress(NotFound):
                await cl.call(
                    cl.snapshots_stub.Remove,
                    snapshots_pb2.RemoveSnapshotRequest(
                        snapshotter=rt.cfg.snapshotter, key=c.meta.id
                    ),
                )
            await asyncio.to_thread(rt.statuses.remove, c.meta.id)
            rt.containers.pop(c.meta.id, None)
            rt.names.release(c.meta.name, c.meta.id)
        rt.emit(c.meta.id, c.meta.sandbox_id, api_pb2.CONTAINER_DELETED_EVENT)

    # ------------------------------------------------------------------ status / list

    def _pb(self, c: CRIContainer) -> api_pb2.Container:
        cfg = c.meta.config_pb()
        return api_pb2.Container(
            id=c.meta.id, pod_sandbox_id=c.meta.sandbox_id, metadata=cfg.metadata,
            image=api_pb2.ImageSpec(image=c.meta.image_id, user_specified_image=cfg.image.image),
            image_ref=c.meta.image_ref, state=c.status.state, created_at=c.meta.created_at,
            labels=cfg.labels, annotations=cfg.annotations, image_id=c.meta.image_id,
        )  # fmt: skip

    async def status(self, id_: str, verbose: bool = False) -> api_pb2.ContainerStatusResponse:
        rt = self.rt
        await rt.ready()
        c = rt.container(id_)
        cfg = c.meta.config_pb()
        st = c.status
        status = api_pb2.ContainerStatus(
            id=c.meta.id, metadata=cfg.metadata, state=st.state, created_at=c.meta.created_at,
            started_at=st.started_at, finished_at=st.finished_at, exit_code=st.exit_code,
            image=api_pb2.ImageSpec(image=c.meta.image_id, user_specified_image=cfg.image.image),
            image_ref=c.meta.image_ref, reason=st.reason, message=st.message,
            labels=cfg.labels, annotations=cfg.annotations, mounts=cfg.mounts,
            log_path=c.meta.log_path, image_id=c.meta.image_id,
            resources=api_pb2.ContainerResources(linux=cfg.linux.resources),
        )  # fmt: skip
        info = {}
        if verbose:
            info["info"] = json.dumps(
                {"pid": st.pid, "sandboxID": c.meta.sandbox_id, "logWriterPid": st.log_writer_pid}
            )
        return api_pb2.ContainerStatusResponse(status=status, info=info)

    async def list_containers(self, f: api_pb2.ContainerFilter | None) -> Wire:
        """The ``ListContainersResponse`` for filter ``f``, in wire form (``WireList``)."""
        rt = self.rt
        await rt.ready()

        def listed(c: CRIContainer, state: int) -> bool:
            if f is not None and not c.meta.sandbox_id.startswith(f.pod_sandbox_id):
                return False
            return filter_matches(f, c.meta.id, state, lambda: c.meta.config_pb().labels)

        def items() -> Iterator[tuple[str, int, bool, Callable[[], api_pb2.Container]]]:
            for c in list(rt.containers.values()):
                state = c.status.state
                yield c.meta.id, state, listed(c, state), functools.partial(self._pb, c)

        return self._wire.answer(items())

    # ------------------------------------------------------------------ exec / update / logs

    async def exec_sync(self, id_: str, cmd: list[str], limit: int) -> tuple[bytes, bytes, int]:
        rt = self.rt
        await rt.ready()
        c = rt.container(id_)
        if c.status.state != api_pb2.CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.meta.id} is not running")
        if not cmd:
            raise InvalidArgument("exec command is empty")
        task = await (await rt.client.load_container(c.meta.id)).task()
        out, err = bytearray(), bytearray()

        def capped(buf: bytearray) -> object:
            async def sink(chunk: bytes) -> None:
                room = MAX_EXEC_OUTPUT - len(buf)
                if room > 0:
                    buf.extend(chunk[:room])

            return sink

        exec_id = secrets.token_hex(16)
        io = await TaskIO.create(exec_id, stdout=capped(out), stderr=capped(err))  # type: ignore[arg-type]
        proc = await task.exec(exec_id, cmd, io=io)
        waiter = asyncio.ensure_future(proc.wait())
        try:
            await proc.start()
            try:
                status = await asyncio.wait_for(asyncio.shield(waiter), limit or None)
            except TimeoutError:
                with contextlib.suppress(PycdError):
                    await proc.kill(signal.SIGKILL)
                await waiter
                raise DeadlineExceeded(f"command {cmd!r} timed out after {limit}s") from None
        finally:
            if not waiter.done():
                with contextlib.suppress(PycdError):
                    await proc.kill(signal.SIGKILL)
            with contextlib.suppress(PycdError):
                await proc.delete(force=True)
            waiter.cancel()
        return bytes(out), bytes(err), status.code

    async def update_resources(self, id_: str, resources: api_pb2.LinuxContainerResources) -> None:
        rt = self.rt
        await rt.ready()
        c = rt.container(id_)
        cl = rt.client
        async with c.lock:
            cfg = c.meta.config_pb()
            cfg.linux.resources.CopyFrom(resources)
            if c.status.state == api_pb2.CONTAINER_RUNNING:
                doc = json.dumps(resources_doc(resources)).encode()
                await cl.call(
                    cl.tasks_stub.Update,
                    tasks_pb2.UpdateTaskRequest(
                        container_id=c.meta.id,
                        resources=any_pb2.Any(type_url=LINUX_RESOURCES_TYPE_URL, value=doc),
                    ),
                )
            c.meta.config = cfg.SerializeToString()
            record = containers_pb2.Container(
                id=c.meta.id,
                extensions={EXT_KEY: any_pb2.Any(type_url=EXT_TYPE, value=c.meta.to_json())},
            )
            await cl.call(
                cl.containers_stub.Update,
                containers_pb2.UpdateContainerRequest(
                    container=record,
                    update_mask=field_mask_pb2.FieldMask(paths=[f"extensions.{EXT_KEY}"]),
                ),
            )

    async def reopen_log(self, id_: str) -> None:
        rt = self.rt
        await rt.ready()
        c = rt.container(id_)
        if c.status.state != api_pb2.CONTAINER_RUNNING:
            raise FailedPrecondition(f"container {c.meta.id} is not running")
        if not rt.signal_pid(c.status.log_writer_pid):
            raise FailedPrecondition(f"container {c.meta.id} has no log writer")
        # kubelet renames the log, then asks for a reopen: answer once the writer has
        # made the new file, as containerd's synchronous reopen does (kubelet renames the
        # file back when this fails).
        if not await asyncio.to_thread(_appears, c.meta.log_path, REOPEN_WAIT):
            raise FailedPrecondition(f"log writer of {c.meta.id} did not reopen its log")


def _appears(path: str, within: float) -> bool:
    deadline = time.monotonic() + within
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _make_fifos(d: os.PathLike[str] | str, tty: bool) -> tuple[str, str]:
    io_dir = os.path.join(d, "io")
    os.makedirs(io_dir, mode=0o700, exist_ok=True)
    paths = []
    for name in ("stdout", "stderr") if not tty else ("stdout",):
        p = os.path.join(io_dir, name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(p)
        os.mkfifo(p, 0o600)
        paths.append(p)
    return paths[0], paths[1] if len(paths) > 1 else ""
