"""``events`` (the daemon's event stream) and ``namespace ls|create|rm``."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING

from google.protobuf import any_pb2
from google.protobuf.json_format import MessageToDict

from pycontainerd.cli.tables import print_table

if TYPE_CHECKING:
    import argparse

    from pycontainerd.cli.state import Settings

__all__: list[str] = []  # commands, found by name from pycontainerd.cli.commands


async def cmd_events(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        async for ev in client.subscribe(*args.filter):
            if isinstance(ev.payload, any_pb2.Any):
                body = {"type_url": ev.payload.type_url}
            else:
                body = MessageToDict(ev.payload)
            stamp = ev.timestamp.isoformat()
            sys.stdout.write(f"{stamp} {ev.namespace} {ev.topic} {json.dumps(body)}\n")
            sys.stdout.flush()
    return 0


async def cmd_ns_ls(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        spaces = await client.list_namespaces()
    if args.quiet:
        for ns in spaces:
            print(ns.name)
        return 0
    rows = [[ns.name, ",".join(f"{k}={v}" for k, v in sorted(ns.labels.items()))] for ns in spaces]
    print_table(sys.stdout, ["NAME", "LABELS"], rows)
    return 0


async def cmd_ns_create(settings: Settings, args: argparse.Namespace) -> int:
    labels = dict(item.partition("=")[::2] for item in args.labels)
    async with settings.client() as client:
        await client.create_namespace(args.name, labels)
    return 0


async def cmd_ns_rm(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        for name in args.names:
            await client.delete_namespace(name)
            print(name)
    return 0
