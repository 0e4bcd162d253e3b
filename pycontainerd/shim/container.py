"""One container in the shim: rootfs, runc state, the init process and its execs.

Create mounts the request's rootfs onto ``<bundle>/rootfs``, opens stdio, runs
``runc create`` and reads the init pid; any failure undoes the mounts and returns runc's
own error text. The runc root is ``<Options.root or the shim's default>/<namespace>``;
the effective options are written to ``<bundle>/options.json`` (containerd's file, Go
field names) so the ``delete`` action can clean up after a dead shim.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pycontainerd import typeurl
from pycontainerd.api.runtime.runc.options import oci_pb2
from pycontainerd.errdefs import AlreadyExists, FailedPrecondition, NotFound, PycdError
from pycontainerd.runtime.runc import Runc, is_not_exist
from pycontainerd.shim.process import ExecProcess, InitProcess, Process, State
from pycontainerd.shim.stdio import ConsoleSocket, StdioPaths, open_io
from pycontainerd.snapshots.mount import Mount, mount_all, unmount_all

if TYPE_CHECKING:
    from collections.abc import Callable

    from pycontainerd.api.runtime.task.v2 import shim_pb2
    from pycontainerd.shim.reaper import Reaper
    from pycontainerd.shim.stdio import ProcessIO

__all__ = ["Container", "read_options", "write_options"]

log = logging.getLogger(__name__)

OPTIONS_FILE = "options.json"
INIT_PID_FILE = "init.pid"
_GO_NAMES = {
    "no_pivot_root": "NoPivotRoot",
    "no_new_keyring": "NoNewKeyring",
    "shim_cgroup": "ShimCgroup",
    "io_uid": "IoUid",
    "io_gid": "IoGid",
    "binary_name": "BinaryName",
    "root": "Root",
    "criu_path": "CriuPath",
    "systemd_cgroup": "SystemdCgroup",
    "criu_image_path": "CriuImagePath",
    "criu_work_path": "CriuWorkPath",
}


def parse_options(any_msg: Any) -> oci_pb2.Options:
    """The runc ``Options`` of a request (defaults when absent or of another type)."""
    opts = oci_pb2.Options()
    if (
        any_msg is not None
        and any_msg.type_url
        and typeurl.type_name(any_msg.type_url).endswith(".Options")
    ):
        opts.ParseFromString(any_msg.value)
    return opts


def write_options(bundle: str, opts: oci_pb2.Options) -> None:
    data = {go: getattr(opts, py) for py, go in _GO_NAMES.items()}
    with open(os.path.join(bundle, OPTIONS_FILE), "w") as f:
        json.dump(data, f)
    with open(os.path.join(bundle, "runtime"), "w") as f:
        f.write(opts.binary_name)


def read_options(bundle: str) -> oci_pb2.Options:
    opts = oci_pb2.Options()
    try:
        with open(os.path.join(bundle, OPTIONS_FILE)) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return opts
    for py, go in _GO_NAMES.items():
        if go in data and data[go] is not None:
            setattr(opts, py, data[go])
    return opts


def _kill_all_on_exit(bundle: str) -> bool:
    """True unless the container has a pid namespace of its own (containerd's rule)."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            spec = json.load(f)
    except (OSError, ValueError):
        return True
    for ns in (spec.get("linux") or {}).get("namespaces") or []:
        if ns.get("type") == "pid" and not ns.get("path"):
            return False
    return True


def _read_pid(path: str, remove: bool = False) -> int:
    with open(path) as f:
        pid = int(f.read().strip())
    if remove:
        os.unlink(path)
    return pid


@dataclass(eq=False)
class Container:
    id: str
    bundle: str
    namespace: str
    runc: Runc
    init: InitProcess
    rootfs: str = ""
    execs: dict[str, ExecProcess] = field(default_factory=dict)
    gate: asyncio.Lock = field(default_factory=asyncio.Lock)
    oom_armed: asyncio.Event = field(default_factory=asyncio.Event)

    @classmethod
    async def create(
        cls,
        req: shim_pb2.CreateTaskRequest,
        *,
        namespace: str,
        runc_root: str,
        reaper: Reaper,
        on_exit: Callable[[Process], None],
    ) -> Container:
        if req.checkpoint:
            raise PycdError("restore from checkpoint is not supported by this shim")
        opts = parse_options(req.options if req.HasField("options") else None)
        root = os.path.join(opts.root or runc_root, namespace)
        opts.root = opts.root or runc_root
        bundle = req.bundle
        mounts = [Mount(m.type, m.source, m.target, tuple(m.options)) for m in req.rootfs]
        rootfs = os.path.join(bundle, "rootfs") if mounts else ""
        paths = StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal)

        def prepare() -> tuple[ProcessIO, bool]:
            write_options(bundle, opts)
            kill_all = _kill_all_on_exit(bundle)
            if rootfs:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(rootfs, 0o711)
                try:
                    mount_all(mounts, rootfs)
                except BaseException:
                    unmount_all(rootfs)
                    raise
            try:
                return open_io(paths, direct=True, keep_stdin=True), kill_all
            except BaseException:
                if rootfs:
                    unmount_all(rootfs)
                raise

        io, kill_all = await asyncio.to_thread(prepare)
        runc = Runc(
            root,
            binary=opts.binary_name,
            log=os.path.join(bundle, "log.json"),
            systemd_cgroup=opts.systemd_cgroup,
            criu=opts.criu_path,
            runner=reaper,
        )
        console = ConsoleSocket() if req.terminal else None
        pid_file = os.path.join(bundle, INIT_PID_FILE)
        try:
            receive = asyncio.ensure_future(console.receive()) if console else None
            try:
                await runc.create(
                    req.id,
                    bundle,
                    pid_file=pid_file,
                    stdio=io.child,
                    console_socket=console.path if console else None,
                    no_pivot=opts.no_pivot_root,
                    no_new_keyring=opts.no_new_keyring,
                )
            except BaseException:
                if receive is not None:
                    receive.cancel()
                raise
            finally:
                io.close_child_fds()
            if receive is not None:
                io.set_console(await asyncio.wait_for(receive, 10.0))
            pid = await asyncio.to_thread(_read_pid, pid_file)
        except BaseException:
            io.close()

            def undo() -> None:
                if rootfs:
                    unmount_all(rootfs)

            await asyncio.to_thread(undo)
            raise
        finally:
            if console is not None:
                console.close()
        init = InitProcess(
            id=req.id,
            container_id=req.id,
            paths=paths,
            pid=pid,
            io=io,
            on_exit=on_exit,
            runc=runc,
            kill_all_on_exit=kill_all,
        )
        container = cls(req.id, bundle, namespace, runc, init, rootfs)
        init.gate = container.gate
        io.start_copies()
        init.watch(reaper.watch(pid))
        return container

    def process(self, exec_id: str) -> Process:
        if not exec_id:
            return self.init
        p = self.execs.get(exec_id)
        if p is None:
            raise NotFound(f"process {exec_id} does not exist")
        return p

    async def start(self) -> int:
        init = self.init
        if init.state == State.STOPPED or init.exited:
            raise PycdError("cannot start a stopped process")
        if init.state != State.CREATED:
            raise FailedPrecondition(f"cannot start a {init.state.name.lower()} process")
        await self.runc.start(self.id)
        if not init.exited:
            init.state = State.RUNNING
        return init.pid

    async def delete_init(self, reaper: Reaper) -> InitProcess:
        init = self.init
        if init.state in (State.RUNNING, State.PAUSED, State.PAUSING) and not init.exited:
            raise FailedPrecondition(f"cannot delete a {init.state.name.lower()} task {self.id}")
        try:
            await self.runc.delete(self.id, force=True)
        except PycdError as exc:
            if not is_not_exist(exc):
                raise
        if not init.exited:
            # A created container: runc delete killed its init; collect that exit.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(init.wait(), 5.0)
            if not init.exited:
                reaper.forget(init.pid)
                init.set_exited(128 + 9)
        for p in list(self.execs.values()):
            p.close_io()
        init.close_io()
        rootfs = self.rootfs
        if rootfs:
            await asyncio.to_thread(unmount_all, rootfs)
        return init

    def add_exec(
        self, req: shim_pb2.ExecProcessRequest, on_exit: Callable[[Process], None]
    ) -> ExecProcess:
        if self.init.exited:
            raise PycdError("cannot exec in a stopped state")
        if req.exec_id in self.execs:
            raise AlreadyExists(f"id {req.exec_id}")
        p = ExecProcess(
            id=req.exec_id,
            container_id=self.id,
            paths=StdioPaths(req.stdin, req.stdout, req.stderr, req.terminal),
            on_exit=on_exit,
            gate=self.gate,
            spec=req.spec.value,
        )
        self.execs[req.exec_id] = p
        return p

    async def start_exec(self, p: ExecProcess, reaper: Reaper) -> int:
        if self.init.exited:
            raise PycdError("cannot exec in a stopped state")
        if p.state != State.CREATED:
            raise FailedPrecondition(f"exec {p.id} is already started")
        base = os.path.join(self.bundle, f".exec-{p.id}")
        spec_file, pid_file = base + ".json", base + ".pid"

        def prepare() -> ProcessIO:
            with open(spec_file, "wb") as f:
                f.write(p.spec)
            return open_io(p.paths, direct=False, keep_stdin=False)

        io = await asyncio.to_thread(prepare)
        console = ConsoleSocket() if p.paths.terminal else None
        try:
            receive = asyncio.ensure_future(console.receive()) if console else None
            try:
                await self.runc.exec(
                    self.id,
                    spec_file,
                    pid_file=pid_file,
                    stdio=io.child,
                    console_socket=console.path if console else None,
                )
            except BaseException:
                if receive is not None:
                    receive.cancel()
                raise
            finally:
                io.close_child_fds()
            if receive is not None:
                io.set_console(await asyncio.wait_for(receive, 10.0))

            def finish() -> int:
                with contextlib.suppress(OSError):
                    os.unlink(spec_file)
                return _read_pid(pid_file, remove=True)

            pid = await asyncio.to_thread(finish)
        except BaseException:
            io.close()
            with contextlib.suppress(OSError):
                os.unlink(spec_file)
            raise
        finally:
            if console is not None:
                console.close()
        p.io, p.pid = io, pid
        io.start_copies()
        p.state = State.RUNNING
        p.watch(reaper.watch(pid))
        return pid

    def delete_exec(self, exec_id: str) -> ExecProcess:
        p = self.execs.get(exec_id)
        if p is None:
            raise NotFound(f"process {exec_id} does not exist")
        if p.state in (State.RUNNING, State.PAUSED) and not p.exited:
            raise FailedPrecondition(f"cannot delete a running process {exec_id}")
        p.close_io()
        del self.execs[exec_id]
        return p

    async def pause(self) -> None:
        if self.init.state != State.RUNNING or self.init.exited:
            raise PycdError(f"cannot pause a {self.init.state.name.lower()} task")
        await self.runc.pause(self.id)
        self.init.state = State.PAUSED

    async def resume(self) -> None:
        if self.init.state != State.PAUSED:
            raise PycdError(f"cannot resume a {self.init.state.name.lower()} task")
        await self.runc.resume(self.id)
        if not self.init.exited:
            self.init.state = State.RUNNING

    async def pids(self) -> list[int]:
        return await self.runc.ps(self.id)
