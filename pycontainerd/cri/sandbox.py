"""Pod sandboxes: run, stop, remove, status and list.

RunPodSandbox reserves the pod's name, makes its network namespace and wires it by CNI
(with the pod's port mappings) unless it uses the host network, writes the pod's
``hostname``, ``hosts`` and ``resolv.conf`` (from its DNS config) into a directory of its
own that every container bind-mounts, mounts the pod's ``/dev/shm`` tmpfs there (see
``store``; the host's ``/dev/shm`` serves a pod in the host IPC namespace), and starts
the sandbox process from the sandbox image in new PID/IPC/UTS namespaces (or the
host's, per the namespace options). Any failure undoes what was done, in reverse.
StopPodSandbox stops the pod's containers, kills the sandbox process, releases its
network and unmounts its ``/dev/shm``; RemovePodSandbox also removes the containers and
records. Both are idempotent, as kubelet expects.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import shutil
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from google.protobuf import any_pb2, field_mask_pb2

from pycontainerd.api.cri.runtime.v1 import api_pb2
from pycontainerd.api.services.containers.v1 import containers_pb2
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2
from pycontainerd.client import Container
from pycontainerd.client.spec import SPEC_TYPE_URL
from pycontainerd.cri import seccomp
from pycontainerd.cri.runtime import CRIRuntime, Sandbox, now_ns
from pycontainerd.cri.spec import sandbox_spec
from pycontainerd.cri.store import (
    EXT_KEY,
    EXT_TYPE,
    KIND_LABEL,
    SANDBOX_KIND,
    SandboxMeta,
    WireList,
    filter_matches,
    mount_shm,
    remove_sandbox_dir,
    sandbox_name,
    unmount_shm,
)
from pycontainerd.errdefs import InvalidArgument, NotFound, PycdError
from pycontainerd.network import PortMapping

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Iterator

    from pycontainerd.client.tasks import Task
    from pycontainerd.cri.images import ImageInfo
    from pycontainerd.grpc.transport import Wire
    from pycontainerd.network import Result

__all__ = ["SandboxService"]

log = logging.getLogger(__name__)

_PROTOCOLS = {api_pb2.TCP: "tcp", api_pb2.UDP: "udp", api_pb2.SCTP: "sctp"}


def _pod_files(d: Path, cfg: api_pb2.PodSandboxConfig, hostname: str) -> None:
    d.mkdir(parents=True, exist_ok=True, mode=0o755)
    (d / "hostname").write_text(hostname + "\n")
    try:
        hosts = Path("/etc/hosts").read_text()
    except OSError:
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
    (d / "hosts").write_text(hosts)
    dns = cfg.dns_config
    if dns.servers or dns.searches or dns.options:
        lines = [f"search {' '.join(dns.searches)}"] if dns.searches else []
        lines += [f"nameserver {s}" for s in dns.servers]
        if dns.options:
            lines.append(f"options {' '.join(dns.options)}")
        (d / "resolv.conf").write_text("\n".join(lines) + "\n")
    else:
        try:
            shutil.copyfile("/etc/resolv.conf", d / "resolv.conf")
        except OSError:
            (d / "resolv.conf").write_text("")


def _prepare_host(
    d: Path, cfg: api_pb2.PodSandboxConfig, hostname: str, seccomp_default: bool
) -> tuple[seccomp.Choice, dict[str, Any] | None]:
    """Pick (and read) the pod's seccomp profile, write its files, mount its /dev/shm."""
    sc = cfg.linux.security_context
    choice = seccomp.choose(sc, privileged=sc.privileged, default_on=seccomp_default)
    localhost = seccomp.load_localhost(choice.path) if choice.kind == "localhost" else None
    _pod_files(d, cfg, hostname)
    if sc.namespace_options.ipc != api_pb2.NODE:
        mount_shm(d)  # last: nothing after it can fail and leave it mounted
    return choice, localhost


class SandboxService:
    def __init__(self, rt: CRIRuntime) -> None:
        self.rt = rt
        self._wire = WireList()

    # ------------------------------------------------------------------ run

    async def run(self, cfg: api_pb2.PodSandboxConfig, runtime_handler: str = "") -> str:
        rt = self.rt
        await rt.ready()
        md = cfg.metadata
        if not (md.name and md.namespace and md.uid):
            raise InvalidArgument("sandbox config must include metadata name, namespace and uid")
        id_ = secrets.token_hex(32)
        name = sandbox_name(md)
        rt.names.reserve(name, id_)
        undo: list[Callable[[], Awaitable[object]]] = []
        try:
            return await self._run(cfg, id_, name, runtime_handler, undo)
        except BaseException:
            for step in reversed(undo):
                try:
                    await step()
                except Exception as exc:
                    log.warning("undoing sandbox %s: %s", id_, exc)
            rt.sandboxes.pop(id_, None)
            rt.names.release(name, id_)
            raise

    async def _run(
        self,
        cfg: api_pb2.PodSandboxConfig,
        id_: str,
        name: str,
        handler: str,
        undo: list[Callable[[], Awaitable[object]]],
    ) -> str:
        rt = self.rt
        image = await rt.images.ensure(rt.cfg.sandbox_image)
        host_net = cfg.linux.security_context.namespace_options.network == api_pb2.NODE
        netns = ""
        wiring: asyncio.Task[Result] | None = None
        if not host_net:
            netns = await rt.network.create_netns(id_)
            undo.append(lambda: rt.network.remove_netns(netns))
            maps = [
                PortMapping(
                    p.host_ip, p.host_port, p.container_port, _PROTOCOLS.get(p.protocol, "tcp")
                )
                for p in cfg.port_mappings
                if p.host_port
            ]
            undo.append(lambda: rt.network.teardown(id_, netns))
            # The CNI plugins wire the namespace while the sandbox container and its task
            # are made (runc create only joins the namespace): the two longest steps of a
            # pod start overlap. The sandbox process starts once both are done.
            wiring = asyncio.ensure_future(
                rt.network.setup(
                    id_, netns, maps, rt.cfg.cni_network,
                    args=(("K8S_POD_NAMESPACE", cfg.metadata.namespace),
                          ("K8S_POD_NAME", cfg.metadata.name),
                          ("K8S_POD_INFRA_CONTAINER_ID", id_),
                          ("K8S_POD_UID", cfg.metadata.uid),
                          ("IgnoreUnknown", "1")),
                )
            )  # fmt: skip
        try:
            sb, task = await self._create_sandbox(cfg, id_, name, handler, image, netns, undo)
        except BaseException:
            if wiring is not None:
                # Let the wiring finish (or fail) before the undo steps tear it down.
                wiring.cancel()
                with contextlib.suppress(BaseException):
                    await wiring
            raise
        if wiring is not None:
            result = await wiring
            sb.meta.ip = result.ip or ""
            sb.meta.additional_ips = [c.ip for c in result.ips if c.ip != sb.meta.ip]
            await _save_meta(rt, sb.meta)
        async with sb.lock:
            sb.pid = await task.start()
            sb.ready = True
        rt.emit(id_, id_, api_pb2.CONTAINER_STARTED_EVENT)
        return id_

    async def _create_sandbox(
        self,
        cfg: api_pb2.PodSandboxConfig,
        id_: str,
        name: str,
        handler: str,
        image: ImageInfo,
        netns: str,
        undo: list[Callable[[], Awaitable[object]]],
    ) -> tuple[Sandbox, Task]:
        """The sandbox's files, container record and (created, not started) task."""
        rt = self.rt
        files = rt.sandbox_dirs / id_
        hostname = cfg.hostname or (socket.gethostname() if not netns else id_[:63])
        undo.append(lambda: asyncio.to_thread(remove_sandbox_dir, files))
        choice, localhost = await asyncio.to_thread(
            _prepare_host, files, cfg, hostname, rt.cfg.seccomp_default
        )
        spec = sandbox_spec(
            cfg, id_, image.config, command=list(rt.cfg.sandbox_command),
            netns=netns, files_dir=str(files), oom=rt.oom,
            seccomp_choice=choice, seccomp_localhost=localhost,
        )  # fmt: skip
        meta = SandboxMeta(
            id=id_, name=name, config=cfg.SerializeToString(), created_at=now_ns(),
            netns=netns, runtime_handler=handler,
        )  # fmt: skip
        container = await self._create_record(meta, image.names[0], spec, cfg, undo)
        sb = Sandbox(meta)
        rt.sandboxes[id_] = sb
        async with sb.lock:
            task = await container.new_task()
            undo.append(lambda: rt.delete_task(id_))
        return sb, task

    async def _create_record(
        self,
        meta: SandboxMeta,
        image_name: str,
        spec: dict[str, object],
        cfg: api_pb2.PodSandboxConfig,
        undo: list[Callable[[], Awaitable[object]]],
    ) -> Container:
        rt = self.rt
        c = rt.client
        snap = rt.cfg.snapshotter
        img = await c.get_image(image_name)
        async with c.lease():
            chain = await rt.image_chain(img)
            await c.call(
                c.snapshots_stub.Prepare,
                snapshots_pb2.PrepareSnapshotRequest(snapshotter=snap, key=meta.id, parent=chain),
            )
            undo.append(lambda: _remove_snapshot(rt, meta.id))
            record = containers_pb2.Container(
                id=meta.id,
                labels={**cfg.labels, KIND_LABEL: SANDBOX_KIND},
                image=image_name,
                runtime=containers_pb2.Container.Runtime(name=rt.cfg.runtime),
                spec=any_pb2.Any(type_url=SPEC_TYPE_URL, value=json.dumps(spec).encode()),
                snapshotter=snap,
                snapshot_key=meta.id,
                extensions={EXT_KEY: any_pb2.Any(type_url=EXT_TYPE, value=meta.to_json())},
            )
            resp = await c.call(
                c.containers_stub.Create, containers_pb2.CreateContainerRequest(container=record)
            )
        undo.append(lambda: _delete_record(rt, meta.id))
        return Container.from_pb(c, resp.container)

    # ------------------------------------------------------------------ stop / remove

    async def stop(self, id_: str) -> None:
        rt = self.rt
        await rt.ready()
        sb = rt.sandbox(id_)
        from pycontainerd.cri.container import ContainerService

        containers = ContainerService(rt)
        for c in [c for c in rt.containers.values() if c.meta.sandbox_id == sb.meta.id]:
            await containers.stop(c.meta.id, 0)
        async with sb.lock:
            await _kill_and_wait(rt, sb)
            if sb.ready:
                rt.emit(sb.meta.id, sb.meta.id, api_pb2.CONTAINER_STOPPED_EVENT)
            sb.ready = False
            if sb.meta.netns:
                await rt.network.teardown(sb.meta.id, sb.meta.netns)
                await rt.network.remove_netns(sb.meta.netns)
            await asyncio.to_thread(unmount_shm, rt.sandbox_dirs / sb.meta.id)

    async def remove(self, id_: str) -> None:
        rt = self.rt
        await rt.ready()
        try:
            sb = rt.sandbox(id_)
        except NotFound:
            return  # idempotent, as containerd's RemovePodSandbox is
        from pycontainerd.cri.container import ContainerService

        containers = ContainerService(rt)
        for c in [c for c in rt.containers.values() if c.meta.sandbox_id == sb.meta.id]:
            await containers.remove(c.meta.id)
        await self.stop(sb.meta.id)
        async with sb.lock:
            await _delete_record(rt, sb.meta.id)
            await _remove_snapshot(rt, sb.meta.id)
            await asyncio.to_thread(remove_sandbox_dir, rt.sandbox_dirs / sb.meta.id)
            rt.sandboxes.pop(sb.meta.id, None)
            rt.names.release(sb.meta.name, sb.meta.id)
        rt.emit(sb.meta.id, sb.meta.id, api_pb2.CONTAINER_DELETED_EVENT)

    # ------------------------------------------------------------------ status / list

    def _pb(self, sb: Sandbox) -> api_pb2.PodSandbox:
        cfg = sb.meta.config_pb()
        return api_pb2.PodSandbox(
            id=sb.meta.id,
            metadata=cfg.metadata,
            state=api_pb2.SANDBOX_READY if sb.ready else api_pb2.SANDBOX_NOTREADY,
            created_at=sb.meta.created_at,
            labels=cfg.labels,
            annotations=cfg.annotations,
            runtime_handler=sb.meta.runtime_handler,
        )

    async def status(self, id_: str, verbose: bool = False) -> api_pb2.PodSandboxStatusResponse:
        rt = self.rt
        await rt.ready()
        sb = rt.sandbox(id_)
        cfg = sb.meta.config_pb()
        ns = cfg.linux.security_context.namespace_options
        status = api_pb2.PodSandboxStatus(
            id=sb.meta.id,
            metadata=cfg.metadata,
            state=api_pb2.SANDBOX_READY if sb.ready else api_pb2.SANDBOX_NOTREADY,
            created_at=sb.meta.created_at,
            network=api_pb2.PodSandboxNetworkStatus(
                ip=sb.meta.ip if sb.ready else "",
                additional_ips=[api_pb2.PodIP(ip=x) for x in sb.meta.additional_ips]
                if sb.ready
                else [],
            ),
            linux=api_pb2.LinuxPodSandboxStatus(
                namespaces=api_pb2.Namespace(
                    options=api_pb2.NamespaceOption(
                        network=ns.network, pid=ns.pid, ipc=ns.ipc, target_id=ns.target_id
                    )
                )
            ),
            labels=cfg.labels,
            annotations=cfg.annotations,
            runtime_handler=sb.meta.runtime_handler,
        )
        info = {}
        if verbose:
            info["info"] = json.dumps(
                {"pid": sb.pid, "netNamespacePath": sb.meta.netns, "image": rt.cfg.sandbox_image}
            )
        return api_pb2.PodSandboxStatusResponse(status=status, info=info)

    async def list_sandboxes(self, f: api_pb2.PodSandboxFilter | None) -> Wire:
        """The ``ListPodSandboxResponse`` for filter ``f``, in wire form (``WireList``)."""
        rt = self.rt
        await rt.ready()

        def listed(sb: Sandbox, state: int) -> bool:
            return filter_matches(f, sb.meta.id, state, lambda: sb.meta.config_pb().labels)

        def items() -> Iterator[tuple[str, int, bool, Callable[[], api_pb2.PodSandbox]]]:
            for sb in list(rt.sandboxes.values()):
                state = api_pb2.SANDBOX_READY if sb.ready else api_pb2.SANDBOX_NOTREADY
                yield sb.meta.id, state, listed(sb, state), functools.partial(self._pb, sb)

        return self._wire.answer(items())


async def _save_meta(rt: CRIRuntime, meta: SandboxMeta) -> None:
    """Record ``meta`` (now with the pod's IPs) in the sandbox's container record."""
    c = rt.client
    record = containers_pb2.Container(
        id=meta.id,
        extensions={EXT_KEY: any_pb2.Any(type_url=EXT_TYPE, value=meta.to_json())},
    )
    await c.call(
        c.containers_stub.Update,
        containers_pb2.UpdateContainerRequest(
            container=record, update_mask=field_mask_pb2.FieldMask(paths=[f"extensions.{EXT_KEY}"])
        ),
    )


async def _kill_and_wait(rt: CRIRuntime, sb: Sandbox) -> None:
    """SIGKILL the sandbox process and delete its task (quiet when there is none)."""
    c = rt.client
    try:
        container = await c.load_container(sb.meta.id)
        task = await container.task()
    except NotFound:
        return
    waiter = asyncio.ensure_future(task.wait())
    try:
        with contextlib.suppress(NotFound, PycdError):
            await task.kill(9, all=True)
        with contextlib.suppress(PycdError):
            await waiter
    finally:
        waiter.cancel()
    await rt.delete_task(sb.meta.id)


async def _remove_snapshot(rt: CRIRuntime, key: str) -> None:
    with contextlib.suppress(NotFound):
        await rt.client.call(
            rt.client.snapshots_stub.Remove,
            snapshots_pb2.RemoveSnapshotRequest(snapshotter=rt.cfg.snapshotter, key=key),
        )


async def _delete_record(rt: CRIRuntime, id_: str) -> None:
    with contextlib.suppress(NotFound):
        await rt.client.call(
            rt.client.containers_stub.Delete, containers_pb2.DeleteContainerRequest(id=id_)
        )
