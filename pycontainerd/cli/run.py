"""``pcd run``: create a container from an image, wire its network, run it.

Attached (the default), the process's output goes to our stdout/stderr and to the
container's log file, and ``run`` exits with the container's exit code. With ``-d`` a
detached logger process (``pycontainerd.cli.logs``) owns the output FIFOs and the
container's id is printed. Everything a failed ``run`` created — task, namespace, IP,
port rules, snapshot, record, log directory — is removed before the error is reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import sys
from typing import TYPE_CHECKING

from pycontainerd.api.services.tasks.v1 import tasks_pb2
from pycontainerd.cli import lifecycle, net
from pycontainerd.cli.images import pull_image
from pycontainerd.cli.logs import LogWriter, release_logger, spawn_logger, write_pid_file
from pycontainerd.cli.state import (
    LABEL_LOG_DIR,
    LABEL_NAME,
    LABEL_NET_DIR,
    LABEL_NETNS,
    LABEL_NETWORK,
    LABEL_PORTS,
    find_image,
    list_rows,
    short_id,
)
from pycontainerd.cli.stdio import attach, make_io
from pycontainerd.cli.tables import parse_size
from pycontainerd.client import Mount, Resources, Task
from pycontainerd.errdefs import AlreadyExists, InvalidArgument, NotFound
from pycontainerd.network import HOST, parse_publish

if TYPE_CHECKING:
    import argparse
    from pathlib import Path

    from pycontainerd.cli.state import Settings
    from pycontainerd.client import Client, Container, Image

__all__ = ["cmd_run", "parse_volume"]

_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]*$")


def parse_volume(spec: str) -> Mount:
    """``/host:/ctr[:ro|rw]`` → a bind mount (a missing host directory is created)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        raise InvalidArgument(f"invalid volume {spec!r}: want /host/path:/container/path[:ro]")
    host, ctr = parts[0], parts[1]
    if not host.startswith("/") or not ctr.startswith("/"):
        raise InvalidArgument(f"invalid volume {spec!r}: both paths must be absolute")
    return Mount.bind(host, ctr, readonly=len(parts) == 3 and parts[2] == "ro")


def _env(items: list[str]) -> list[str]:
    out = []
    for item in items:
        if "=" in item:
            out.append(item)
        elif item in os.environ:
            out.append(f"{item}={os.environ[item]}")
    return out


async def _ensure_image(client: Client, args: argparse.Namespace) -> Image:
    if args.pull != "always":
        try:
            return await find_image(client, args.image)
        except NotFound:
            if args.pull == "never":
                raise NotFound(f"image {args.image!r} not found locally") from None
        print(f"Unable to find image '{args.image}' locally", file=sys.stderr)
    return await pull_image(client, args, args.image)


async def _check_name(client: Client, name: str) -> None:
    if not _NAME.match(name):
        raise InvalidArgument(f"invalid container name {name!r}: want [a-zA-Z0-9][a-zA-Z0-9_.-]*")
    for row in await list_rows(client):
        if row.name == name:
            owner = short_id(row.container.id)
            raise AlreadyExists(f'container name "{name}" is already in use by container {owner}')


async def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    network: str = args.network
    if network not in net.NETWORKS:
        raise InvalidArgument(f"unknown network {network!r}: want bridge, host or none")
    maps = [parse_publish(p) for p in args.publish]
    if maps and network != net.BRIDGE:
        raise InvalidArgument(f"ports cannot be published on network {network!r}")
    if args.rm and args.detach:
        raise InvalidArgument("--rm and -d cannot be combined: remove it with pcd rm")
    mounts = [parse_volume(v) for v in args.volume]
    resources = None
    if args.memory or args.cpus:
        memory = parse_size(args.memory) if args.memory else None
        resources = Resources(memory=memory, cpus=args.cpus)
    max_size = parse_size(args.log_max_size)
    async with settings.client() as client:
        if args.name:
            await _check_name(client, args.name)
        image = await _ensure_image(client, args)
        await net.check_ports(client, maps)
        for m in mounts:
            await asyncio.to_thread(os.makedirs, m.source, exist_ok=True)
        cid = secrets.token_hex(32)
        cdir = settings.log_dir(cid)
        netns = net.netns_path(settings, network, cid)
        hostname = args.hostname or (None if network == HOST else short_id(cid))
        labels = {LABEL_NETWORK: network, LABEL_LOG_DIR: str(cdir)}
        if args.name:
            labels[LABEL_NAME] = args.name
        if maps:
            labels[LABEL_PORTS] = net.ports_label(maps)
        if netns:
            labels[LABEL_NETNS] = netns
            labels[LABEL_NET_DIR] = str(settings.net_dir)
            mounts += [
                Mount.bind(str(cdir / "hosts"), "/etc/hosts"),
                Mount.bind(str(cdir / "resolv.conf"), "/etc/resolv.conf"),
            ]
        container = await client.create_container(
            cid, image.name, args=args.command or None, env=_env(args.env), cwd=args.workdir,
            mounts=mounts, tty=args.tty, user=args.user, hostname=hostname,
            resources=resources, privileged=args.privileged, network=netns or HOST,
            runtime=args.runtime, labels=labels,
        )  # fmt: skip
        try:
            result = await net.attach(settings, cid, network, maps)
            await asyncio.to_thread(cdir.mkdir, parents=True, exist_ok=True)
            if netns:
                await asyncio.to_thread(net.write_etc_files, cdir, hostname or cid, result)
            if args.detach:
                await _run_detached(client, container, cdir, args.tty, max_size, args)
                print(cid)
                return 0
            code = await _run_attached(client, container, cdir, max_size, args)
        except BaseException:
            await lifecycle.remove_quietly(settings, client, container)
            raise
        if args.rm:
            await lifecycle.remove(settings, client, container, force=True)
        return code


async def _run_detached(
    client: Client,
    container: Container,
    cdir: Path,
    terminal: bool,
    max_size: int,
    args: argparse.Namespace,
) -> None:
    proc, out, err = await asyncio.to_thread(
        spawn_logger, cdir, terminal=terminal, max_size=max_size, max_files=args.log_max_files
    )
    try:
        req = tasks_pb2.CreateTaskRequest(
            container_id=container.id,
            rootfs=await container.rootfs(),
            terminal=terminal,
            stdout=out,
            stderr=err,
        )
        resp = await client.call(client.tasks_stub.Create, req)
    except BaseException:
        await asyncio.to_thread(release_logger, proc, start=False)
        raise
    await asyncio.to_thread(release_logger, proc, start=True)
    await Task(client, container.id, resp.pid, None, container.spec).start()


async def _run_attached(
    client: Client,
    container: Container,
    cdir: Path,
    max_size: int,
    args: argparse.Namespace,
) -> int:
    log = await asyncio.to_thread(LogWriter, cdir, max_size, args.log_max_files)
    await asyncio.to_thread(write_pid_file, cdir)
    try:
        io = await make_io(container.id, interactive=args.interactive, terminal=args.tty, log=log)
        task = await container.new_task(io)
        try:
            status = await attach(task, interactive=args.interactive, terminal=args.tty)
        except BaseException:
            with contextlib.suppress(NotFound):
                await task.delete(force=True)
            raise
    finally:
        await asyncio.to_thread(log.close)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread((cdir / "logger.pid").unlink)
    await lifecycle.record_exit(client, container, status)
    await task.delete()
    return status.code
