"""Push: Content service -> registry, children first.

Blobs (config and layers) go first, in parallel, each skipped when a ``HEAD`` finds it
already there; then each platform manifest by digest; then the root (index or
manifest) under the reference's tag. Blob bytes stream from ``Content.Read`` into a
monolithic ``PUT``, or into ``PATCH`` chunks when ``chunk_size`` is set.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from pycontainerd.client.oci import is_index, is_manifest, parse_index, parse_manifest
from pycontainerd.client.pull import Progress, run_all
from pycontainerd.client.reference import parse
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

    from pycontainerd.client._sdk import Client
    from pycontainerd.client.images import Image
    from pycontainerd.client.oci import Descriptor, Platform
    from pycontainerd.client.reference import Reference
    from pycontainerd.client.registry import Registry

__all__ = ["push"]


def _noop(_: Progress) -> None:
    return None


async def push(
    client: Client,
    ref: str,
    image: Image | str,
    registry: Registry,
    *,
    platform: Platform | None = None,
    chunk_size: int | None = None,
    concurrency: int = 4,
    progress: Callable[[Progress], None] | None = None,
) -> Descriptor:
    """Upload ``image`` as ``ref``; returns the descriptor the tag now points at.

    An index is pushed whole when all its manifests are in the content store; with
    ``platform`` only that platform's manifest is pushed (as the tag's target).
    """
    report = progress or _noop
    reference = parse(ref)
    img = await client.get_image(image) if isinstance(image, str) else image
    root = img.target
    manifests: list[Descriptor]
    if is_index(root.media_type):
        if platform is not None:
            root, _ = await client.images.manifest_for(root, platform)
            manifests = [root]
        else:
            idx = parse_index(await client.content.read_all(root.digest), root.media_type)
            manifests = list(idx.manifests)
            missing = [m.digest for m in manifests if not await client.content.exists(m.digest)]
            if missing:
                raise FailedPrecondition(
                    f"{img.name}: index lists {len(missing)} manifest(s) not in the content "
                    "store (pulled for one platform?); push with a platform instead"
                )
    elif is_manifest(root.media_type):
        manifests = [root]
    else:
        raise InvalidArgument(f"{img.name}: unsupported media type {root.media_type!r}")
    sem = asyncio.Semaphore(max(1, concurrency))
    for mdesc in manifests:
        data = await client.content.read_all(mdesc.digest)
        m = parse_manifest(data, mdesc.media_type)
        await run_all(
            _push_blob(client, registry, reference, d, sem, chunk_size, report)
            for d in (m.config, *m.layers)
        )
        if mdesc is not root:
            await registry.put_manifest(reference, mdesc.digest, mdesc.media_type, data)
    data = await client.content.read_all(root.digest)
    await registry.put_manifest(reference, reference.object, root.media_type, data)
    report(Progress("done", root.digest, root.size, root.size))
    return root


async def _push_blob(
    client: Client,
    registry: Registry,
    ref: Reference,
    desc: Descriptor,
    sem: asyncio.Semaphore,
    chunk_size: int | None,
    report: Callable[[Progress], None],
) -> None:
    async with sem:
        if await registry.blob_exists(ref, desc.digest):
            report(Progress("exists", desc.digest, desc.size, desc.size))
            return

        async def source() -> AsyncIterator[bytes]:
            report(Progress("start", desc.digest, 0, desc.size))
            done = 0
            async for chunk in client.content.read(desc.digest):
                done += len(chunk)
                yield chunk
                report(Progress("bytes", desc.digest, done, desc.size))

        await registry.upload_blob(ref, desc, source, chunk_size=chunk_size)
        report(Progress("done", desc.digest, desc.size, desc.size))
