"""Image commands: ``pull``, ``push``, ``images``/``image ls``, ``image rm``/``rmi``,
``image prune``, ``tag``, ``load``, ``save``.

Registry options (``--insecure-registry``, ``--ca-file``, ``--username``/``--password``,
or ``PCD_INSECURE_REGISTRIES`` / ``PCD_REGISTRY_USERNAME`` / ``PCD_REGISTRY_PASSWORD``)
apply to the host named in the reference being pulled or pushed. Short names are
normalized as Docker does (``busybox`` → ``docker.io/library/busybox:latest``); a local
name is tried as typed first, so images imported under any name stay usable.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime
from typing import TYPE_CHECKING, Any

from pycontainerd.cli.commands import registry_settings
from pycontainerd.cli.progress import ProgressDisplay
from pycontainerd.cli.state import describe, find_image, list_rows
from pycontainerd.cli.tables import ago, human_size, print_table
from pycontainerd.client import Registry, RegistryHost
from pycontainerd.client.reference import parse
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument, NotFound, PycdError

if TYPE_CHECKING:
    import argparse

    from pycontainerd.cli.state import Settings
    from pycontainerd.client import Client, Image

__all__ = ["cmd_pull", "cmd_push", "make_registry", "pull_image"]


def make_registry(args: argparse.Namespace, host: str) -> Registry:
    return Registry({host: RegistryHost(**registry_settings(args, host))})


async def pull_image(client: Client, args: argparse.Namespace, name: str) -> Image:
    try:
        ref = parse(name)
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid reference format: {exc.message}") from None
    display = ProgressDisplay(sys.stderr)
    try:
        image = await client.pull(str(ref), make_registry(args, ref.host), progress=display)
    except PycdError as exc:
        raise type(exc)(f"pull {ref}: {exc.message or exc}") from None
    finally:
        display.close()
    print(f"Pulled {image.name} ({image.target.digest})", file=sys.stderr)
    return image


# ---------------------------------------------------------------------------- commands


async def cmd_pull(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        image = await pull_image(client, args, args.reference)
    print(image.name)
    return 0


async def cmd_push(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        image = await find_image(client, args.image)
        target = args.target or image.name
        try:
            ref = parse(target)
        except InvalidArgument as exc:
            raise InvalidArgument(f"invalid reference format: {exc.message}") from None
        display = ProgressDisplay(sys.stderr, verb="Pushing")
        try:
            desc = await client.push(
                str(ref), image, make_registry(args, ref.host), progress=display
            )
        except PycdError as exc:
            raise type(exc)(f"push {ref}: {exc.message or exc}") from None
        finally:
            display.close()
    print(f"{ref}: digest: {desc.digest} size: {desc.size}")
    return 0


def _split_name(name: str) -> tuple[str, str]:
    repo = name.partition("@")[0]
    head, colon, tag = repo.rpartition(":")
    if colon and "/" not in tag:
        repo = head
    else:
        tag = ""
    if repo.startswith("docker.io/library/"):
        repo = repo[len("docker.io/library/") :]
    return repo, tag or "<none>"


async def _image_row(client: Client, img: Image) -> list[str]:
    repo, tag = _split_name(img.name)
    size, created = "-", ago(img.created_at)
    try:
        resolved = await client.resolve_image(img)
        m = resolved.manifest
        size = human_size(m.config.size + sum(layer.size for layer in m.layers))
        when = resolved.config.get("created")
        if isinstance(when, str) and when:
            created = ago(datetime.fromisoformat(when.replace("Z", "+00:00")[:32]))
    except (PycdError, ValueError):
        pass  # content for this platform missing: still list the name
    return [repo, tag, img.target.digest.split(":", 1)[-1][:12], size, created]


async def cmd_images(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        images = sorted(await client.list_images(), key=lambda i: i.name)
        rows = [await _image_row(client, img) for img in images]
    if args.quiet:
        for img in images:
            print(img.name)
        return 0
    print_table(sys.stdout, ["REPOSITORY", "TAG", "DIGEST", "SIZE", "CREATED"], rows)
    return 0


async def _used_images(client: Client) -> dict[str, str]:
    return {r.container.image: r.container.id for r in await list_rows(client)}


async def cmd_rmi(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        used = await _used_images(client)
        failed = 0
        for i, name in enumerate(args.images):
            try:
                image = await find_image(client, name)
                if image.name in used and not args.force:
                    raise FailedPrecondition(
                        f"image {image.name} is used by container {used[image.name][:12]}"
                    )
                await client.remove_image(image.name, sync=i == len(args.images) - 1)
                print(f"Untagged: {image.name}")
            except PycdError as exc:
                print(f"pcd: {describe(exc)}", file=sys.stderr)
                failed += 1
    return 1 if failed else 0


async def cmd_prune(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        used = await _used_images(client)
        victims = [
            img
            for img in await client.list_images()
            if img.name not in used and (args.all or _split_name(img.name)[1] == "<none>")
        ]
        for i, img in enumerate(victims):
            await client.remove_image(img.name, sync=i == len(victims) - 1)
            print(f"Deleted: {img.name}")
    print(f"Total: {len(victims)} image(s) removed")
    return 0


async def cmd_tag(settings: Settings, args: argparse.Namespace) -> int:
    try:
        target = str(parse(args.target))
    except InvalidArgument as exc:
        raise InvalidArgument(f"invalid reference format: {exc.message}") from None
    async with settings.client() as client:
        source = await find_image(client, args.source)
        await client.tag_image(source.name, target)
    return 0


async def cmd_load(settings: Settings, args: argparse.Namespace) -> int:
    if not await asyncio.to_thread(os.path.isfile, args.input):
        raise NotFound(f"archive {args.input}")
    async with settings.client() as client:
        images = await client.import_archive(args.input)
    for img in images:
        print(f"Loaded image: {img.name}")
    return 0


async def cmd_save(settings: Settings, args: argparse.Namespace) -> int:
    async with settings.client() as client:
        names = [(await find_image(client, n)).name for n in args.images]
        await client.export_archive(args.output, *names)
    return 0


async def cmd_image_inspect(settings: Settings, args: argparse.Namespace) -> int:
    out: list[dict[str, Any]] = []
    async with settings.client() as client:
        for name in args.images:
            out.append(await image_document(client, await find_image(client, name)))
    print(json.dumps(out, indent=2))
    return 0


async def image_document(client: Client, img: Image) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "Name": img.name,
        "Target": {
            "mediaType": img.target.media_type,
            "digest": img.target.digest,
            "size": img.target.size,
        },
        "Labels": img.labels,
        "CreatedAt": img.created_at.isoformat() if img.created_at else None,
    }
    try:
        resolved = await client.resolve_image(img)
        doc["Manifest"] = resolved.manifest_desc.digest
        doc["Config"] = resolved.config
    except PycdError as exc:
        doc["Error"] = str(exc)
    return doc
