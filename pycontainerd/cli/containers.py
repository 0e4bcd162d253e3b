"""Container commands: ``ps``, ``exec``, ``stop``, ``kill``, ``rm``, ``container prune``,
``logs`` and ``inspect``. Containers are named by full id, ``--name``, or an id prefix."""

from __future__ import annotations

import json
import secrets
import shlex
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycontainerd.cli import lifecycle, net
from pycontainerd.cli.images import image_document
from pycontainerd.cli.logs import follow_logs, log_files
from pycontainerd.cli.state import (
    LABEL_EXIT_CODE,
    LABEL_FINISHED,
    LABEL_LOG_DIR,
    LABEL_NET_DIR,
    LABEL_NETNS,
    LABEL_NETWORK,
    describe,
    find_container,
    find_image,
    list_rows,
    short_id,
)
from pycontainerd.cli.stdio import attach, make_io
from pycontainerd.cli.tables import ago, duration, print_table, truncate
from pycontainerd.errdefs import FailedPrecondition, NotFound, PycdError

if TYPE_CHECKING:
    import argparse

    from pycontainerd.cli.logs import Record
    from pycontainerd.cli.state import ContainerRow, Settings

__all__: list[str] = []  # commands, found by name from pycontainerd.cli.commands


def _status(row: ContainerRow, now: datetime) -> str:
    if row.status in ("running", "pausing"):
        return "Up " + duration((now - row.created_at).total_seconds())
    if row.status == "paused":
        return "Up (Paused)"
    if row.status == "created":
        return "Created"
    if row.status == "stopped":
        return f"Exited ({row.exit_code}) {ago(row.exited_at, now)}"
    code = row.container.labels.get(LABEL_EXIT_CODE)
    if code is not None:
        finished = row.container.labels.get(LABEL_FINISHED, "")
        try:
            when: datetime | None = datetime.fromisoformat(finished)
        except ValueError:
            when = None
        return f"Exited ({code}) {ago(when, now)}"
    return "Created"


def _command(row: ContainerRow) -> str:
    args = row.container.spec.get("process", {}).get("args") or []
    return '"' + truncate(shlex.join(str(a) for a in args), 20) + '"'


async def cmd_ps(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        rows = await list_rows(client)
    now = datetime.now(UTC)
    shown = [r for r in reversed(rows) if args.all or r.status in ("running", "paused", "pausing")]
    if args.quiet:
        for r in shown:
            print(short_id(r.container.id))
        return 0
    table = [
        [
            short_id(r.container.id),
            r.container.image.removeprefix("docker.io/library/"),
            _command(r),
            ago(r.created_at, now),
            _status(r, now),
            net.format_ports(net.ports_from_label(r.container.labels)),
            r.name,
        ]
        for r in shown
    ]
    headers = ["CONTAINER ID", "IMAGE", "COMMAND", "CREATED", "STATUS", "PORTS", "NAMES"]
    print_table(sys.stdout, headers, table)
    return 0


async def cmd_exec(settings: Settings, args: argparse.Namespace) -> int:
    if not args.command:
        raise PycdError("exec needs a command")
    async with settings.client() as client:
        row = await find_container(client, args.container)
        if row.status not in ("running", "paused"):
            raise FailedPrecondition(f"container {args.container} is not running")
        task = await row.container.task()
        exec_id = "exec-" + secrets.token_hex(8)
        io = await make_io(exec_id, interactive=args.interactive, terminal=args.tty)
        process = await task.exec(
            exec_id, list(args.command), io=io, env=args.env or None, cwd=args.workdir,
            tty=args.tty,
        )  # fmt: skip
        try:
            status = await attach(process, interactive=args.interactive, terminal=args.tty)
        finally:
            try:
                await process.delete(force=True)
            except NotFound:
                await io.close(grace=0)
    return status.code


async def cmd_stop(settings: Settings, args: argparse.Namespace) -> int:
    return await _each(settings, args.containers, "stop", args.time)


async def cmd_kill(settings: Settings, args: argparse.Namespace) -> int:
    sig = lifecycle.parse_signal(args.signal)
    async with settings.client() as client:
        failed = 0
        for ref in args.containers:
            try:
                row = await find_container(client, ref)
                if row.status not in lifecycle.RUNNING:
                    raise FailedPrecondition(f"container {ref} is not running")
                await (await row.container.task()).kill(sig)
                print(ref)
            except PycdError as exc:
                print(f"pcd: {describe(exc)}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


async def cmd_rm(settings: Settings, args: argparse.Namespace) -> int:
    return await _each(settings, args.containers, "rm-force" if args.force else "rm", 0)


async def _each(settings: Settings, refs: list[str], action: str, grace: float) -> int:
    failed = 0
    async with settings.client() as client:
        for ref in refs:
            try:
                row = await find_container(client, ref)
                if action == "stop":
                    await lifecycle.stop(client, row.container, grace)
                else:
                    force = action == "rm-force"
                    await lifecycle.remove(settings, client, row.container, force=force)
                print(ref)
            except PycdError as exc:
                print(f"pcd: {describe(exc)}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


async def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        removed = 0
        for row in await list_rows(client):
            if row.status in lifecycle.RUNNING or row.status == "created":
                continue
            await lifecycle.remove(settings, client, row.container, force=False)
            print(f"Deleted: {row.container.id}")
            removed += 1
        # A crash between a run's steps can leave namespaces or IPs without a container.
        leaked = await net.reclaim(settings, client)
    for item in leaked:
        print(f"Reclaimed: {item}")
    print(f"Total: {removed} container(s) removed")
    return 0


async def cmd_logs(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        row = await find_container(client, args.container)
    log_dir = row.container.labels.get(LABEL_LOG_DIR)
    if not log_dir or not log_files(Path(log_dir)):
        raise NotFound(f"container {args.container} has no logs")

    def emit(rec: Record) -> None:
        out = sys.stderr if rec.stream == "stderr" else sys.stdout
        if args.timestamps:
            out.write(rec.time + " ")
            out.flush()
        out.buffer.write(rec.data)
        out.flush()

    await follow_logs(Path(log_dir), emit, follow=args.follow, tail=args.tail)
    return 0


async def cmd_inspect(settings: Settings, args: argparse.Namespace) -> int:
    out: list[dict[str, Any]] = []
    async with settings.client() as client:
        for ref in args.objects:
            try:
                row = await find_container(client, ref)
            except NotFound:
                try:
                    out.append(await image_document(client, await find_image(client, ref)))
                except NotFound:
                    raise NotFound(f"no such object: {ref}") from None
                continue
            out.append(await _container_document(settings, row))
    print(json.dumps(out, indent=2, default=str))
    return 0


async def _container_document(settings: Settings, row: ContainerRow) -> dict[str, Any]:
    c = row.container
    doc: dict[str, Any] = {
        "Id": c.id,
        "Name": row.name,
        "Image": c.image,
        "Created": row.created_at.isoformat(),
        "Runtime": c.runtime,
        "Snapshotter": c.snapshotter,
        "State": {
            "Status": _status(row, datetime.now(UTC)),
            "Task": row.status or None,
            "Pid": row.pid or None,
            "ExitCode": row.exit_code
            if row.exit_code is not None
            else c.labels.get(LABEL_EXIT_CODE),
        },
        "Labels": c.labels,
        "Spec": c.spec,
        "LogDir": c.labels.get(LABEL_LOG_DIR),
    }
    network = c.labels.get(LABEL_NETWORK)
    if network:
        ports = net.ports_from_label(c.labels)
        doc["Network"] = {
            "Mode": network,
            "Namespace": c.labels.get(LABEL_NETNS),
            "Ports": net.format_ports(ports),
        }
        netns = c.labels.get(LABEL_NETNS)
        if netns:
            manager = settings.network_manager(c.labels.get(LABEL_NET_DIR), netns)
            result = await manager.attachment(c.id)
            if result is not None:
                doc["Network"]["IPAddress"] = result.ip
                doc["Network"]["Gateway"] = result.gateway
    return doc
