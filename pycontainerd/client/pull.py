"""Pull: registry -> Content service -> image record -> snapshots, under one lease.

The root manifest (or index) is fetched by tag or digest; for an index only the
requested platform's manifest is fetched. Config and layers are streamed into the
Content service in parallel (bounded), each under a stable ingest ref
(``layer-sha256:...``) so a pull that dies midway leaves a partial ingest which the next
pull resumes with a ``Range`` request; the daemon verifies each blob's digest at commit.
The pull's lease is labelled with the reference and kept when the pull fails (it
expires after 24 h), because deleting it would let the garbage collector take the
partial ingests; the next pull of that reference adopts it and deletes it on success.
Progress is reported through an optional callback (for progress bars and tests).

Where the daemon offers pycontainerd's ``Pull`` service, ``pull`` asks it to do all this
itself (``in_daemon``): the bytes then go from the registry straight to the daemon's
disk, which unpacks each layer while it downloads. Against a daemon without it (real
containerd) the same pull runs here, in the client. The daemon runs this very code, with
``fetcher`` and ``applier`` hooks for its streamed layers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pycontainerd.api.services.pull.v1 import pull_pb2
from pycontainerd.api.types import platform_pb2
from pycontainerd.client.images import Image, LayerApplier, gc_child_labels, unpack
from pycontainerd.client.oci import (
    Descriptor,
    is_index,
    is_manifest,
    parse_index,
    parse_manifest,
    select_platform,
)
from pycontainerd.client.reference import parse
from pycontainerd.errdefs import InvalidArgument, NotFound, Unimplemented

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Coroutine, Iterable

    from pycontainerd.client._sdk import Client
    from pycontainerd.client.oci import Platform
    from pycontainerd.client.reference import Reference
    from pycontainerd.client.registry import Registry

__all__ = ["PULL_LABEL", "LayerFetcher", "Progress", "ProgressFn", "pull", "run_all"]

PULL_LABEL = "pycontainerd.io/pull"


@dataclass(frozen=True, slots=True)
class Progress:
    """One step of a transfer.

    ``kind`` is ``resolved`` (root descriptor known), ``manifest`` (the platform
    manifest stored), ``start`` (a blob transfer begins at ``offset``), ``bytes``
    (``offset`` bytes of ``total`` are done), ``done`` (a blob is committed, or was
    already present), ``exists`` (push: the registry has it), ``extracted`` (the
    daemon's pull unpacked this layer while downloading it), or ``unpacked``.
    """

    kind: str
    digest: str = ""
    offset: int = 0
    total: int = 0


ProgressFn = Callable[[Progress], None]

# Fetches a layer into the content store another way than by relaying it through the
# Content service; returns False to leave it to that default.
LayerFetcher = Callable[["Reference", Descriptor, ProgressFn], Awaitable[bool]]


def _noop(_: Progress) -> None:
    return None


async def pull(
    client: Client,
    ref: str,
    registry: Registry,
    *,
    platform: Platform | None = None,
    unpack_image: bool = True,
    snapshotter: str | None = None,
    concurrency: int = 4,
    progress: Callable[[Progress], None] | None = None,
    in_daemon: bool | None = None,
    fetcher: LayerFetcher | None = None,
    applier: LayerApplier | None = None,
) -> Image:
    """Fetch ``ref`` into the daemon, record it as an image, and unpack it.

    ``in_daemon``: True has the daemon's Pull service do it (Unimplemented if it has
    none), False pulls from this process, None (the default) uses the service when the
    daemon offers it.
    """
    reference = parse(ref)
    report = progress or _noop
    if in_daemon is not False:
        try:
            return await _pull_in_daemon(
                client, str(reference), registry, platform, unpack_image, snapshotter,
                concurrency, report,
            )  # fmt: skip
        except _NoService:
            if in_daemon:
                raise Unimplemented("the daemon has no Pull service") from None
    hooks = (fetcher, applier)
    if client.current_lease():
        return await _pull(client, reference, registry, platform, unpack_image, snapshotter,
                           concurrency, report, hooks)  # fmt: skip
    # The lease outlives a failed pull (it expires in 24 h): it keeps the partial
    # ingests alive, and the next pull of the same reference adopts it and resumes them.
    leases = [x for x in await client.list_leases() if x.labels.get(PULL_LABEL) == str(reference)]
    lease = leases[0] if leases else await client.create_lease(labels={PULL_LABEL: str(reference)})
    with client.using_lease(lease.id):
        image = await _pull(client, reference, registry, platform, unpack_image, snapshotter,
                            concurrency, report, hooks)  # fmt: skip
    await client.delete_lease(lease.id)
    return image


class _NoService(Exception):
    """The daemon answered UNIMPLEMENTED before any progress: it has no Pull service."""


async def _pull_in_daemon(
    client: Client,
    ref: str,
    registry: Registry,
    platform: Platform | None,
    unpack_image: bool,
    snapshotter: str | None,
    concurrency: int,
    report: ProgressFn,
) -> Image:
    req = pull_pb2.PullRequest(
        reference=ref, unpack=unpack_image, snapshotter=snapshotter or "", concurrency=concurrency
    )
    if platform is not None:
        req.platform.CopyFrom(
            platform_pb2.Platform(
                os=platform.os, architecture=platform.architecture, variant=platform.variant
            )
        )
    for host, cfg in registry.hosts.items():
        ca = cfg.ca_pem
        if cfg.ca_file and not ca:
            ca = await asyncio.to_thread(Path(cfg.ca_file).read_text)
        req.hosts.add(
            host=host, insecure=cfg.insecure, ca_pem=ca, username=cfg.username,
            password=cfg.password,
        )  # fmt: skip
    name = ""
    started = False
    try:
        async for msg in client.stream(client.pull_stub.Pull, req):
            started = True
            if msg.kind == "image":
                name = msg.image_name
            else:
                report(Progress(msg.kind, msg.digest, msg.offset, msg.total))
    except Unimplemented:
        if started:
            raise
        raise _NoService from None
    if not name:
        raise NotFound(f"{ref}: the daemon's pull ended without an image")
    return await client.images.get(name)


async def _pull(
    client: Client,
    reference: Reference,
    registry: Registry,
    platform: Platform | None,
    unpack_image: bool,
    snapshotter: str | None,
    concurrency: int,
    report: Callable[[Progress], None],
    hooks: tuple[LayerFetcher | None, LayerApplier | None] = (None, None),
) -> Image:
    ref = str(reference)
    fetcher, applier = hooks
    root, data = await registry.get_manifest(reference)
    report(Progress("resolved", root.digest, 0, root.size))
    await _store(client, root, data)
    manifest_desc, manifest_data = root, data
    if is_index(root.media_type):
        chosen = select_platform(parse_index(data, root.media_type), platform)
        manifest_desc, manifest_data = await registry.get_manifest(reference, chosen.digest)
        if manifest_desc.digest != chosen.digest:
            raise InvalidArgument(f"index entry {chosen.digest} answered another manifest")
        await _store(client, manifest_desc, manifest_data)
    elif not is_manifest(root.media_type):
        raise InvalidArgument(f"{ref}: unsupported media type {root.media_type!r}")
    manifest = parse_manifest(manifest_data, manifest_desc.media_type)
    report(Progress("manifest", manifest_desc.digest, 0, manifest_desc.size))
    sem = asyncio.Semaphore(max(1, concurrency))
    blobs = [("config", manifest.config)] + [("layer", d) for d in manifest.layers]
    await run_all(
        _fetch(
            client,
            registry,
            reference,
            kind,
            desc,
            sem,
            report,
            fetcher if kind == "layer" else None,
        )
        for kind, desc in blobs
    )
    await gc_child_labels(client.content, manifest_desc)
    if manifest_desc is not root:
        await gc_child_labels(client.content, root)
    name = str(reference)
    image = await client.images.put(
        Image(name, Descriptor(root.media_type, root.digest, root.size))
    )
    if unpack_image:
        snap = snapshotter or await client.default_snapshotter()
        await unpack(client, client.images, image, snap, platform, applier)
        report(Progress("unpacked", root.digest))
    return image


async def run_all(coros: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run concurrently; on failure cancel the rest and raise the first error itself
    (not an ExceptionGroup), so callers see one clear domain error."""
    try:
        async with asyncio.TaskGroup() as tg:
            for c in coros:
                tg.create_task(c)
    except BaseExceptionGroup as eg:
        first = eg.exceptions[0]
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def _store(client: Client, desc: Descriptor, data: bytes) -> None:
    kind = "index" if is_index(desc.media_type) else "manifest"
    await client.content.ingest(f"{kind}-{desc.digest}", data, expected=desc.digest, size=desc.size)


async def _fetch(
    client: Client,
    registry: Registry,
    ref: Reference,
    kind: str,
    desc: Descriptor,
    sem: asyncio.Semaphore,
    report: Callable[[Progress], None],
    fetcher: LayerFetcher | None = None,
) -> None:
    async with sem:
        if fetcher is not None and await fetcher(ref, desc, report):
            return

        async def source(offset: int) -> AsyncIterator[bytes]:
            report(Progress("start", desc.digest, offset, desc.size))
            done = offset
            async for chunk in registry.fetch_blob(ref, desc, offset):
                done += len(chunk)
                yield chunk
                report(Progress("bytes", desc.digest, done, desc.size))

        await client.content.ingest(
            f"{kind}-{desc.digest}", source, expected=desc.digest, size=desc.size
        )
        report(Progress("done", desc.digest, desc.size, desc.size))
