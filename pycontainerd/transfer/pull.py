"""The daemon's own pull: registry to disk without a client in between, layers unpacked
while they download.

It runs the client SDK's pull (``pycontainerd.client.pull``) inside the daemon, over
the in-process channel, so leases, resume, gc labels, image records and events are the
same as for any client's pull. Two hooks change how layers move:

- ``fetch``: a layer's bytes go from the registry straight into its content ingest, and
  the speculative unpacker (:mod:`.staging`) unpacks the ingest's file as it grows into
  a staging directory; the layer is committed as usual, digest verified;
- ``apply``: when the unpack reaches that layer, its staging directory is moved into the
  fresh snapshot instead of Diff.Apply reading the blob back (and a progress report
  says so: ``extracted``).

A layer whose ingest is resumed (a previous pull died midway), shared with another
namespace, or not a layer media type takes the SDK's ordinary path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from pycontainerd import namespaces
from pycontainerd.archive import UnsupportedMediaType, compression_for_media_type
from pycontainerd.client._sdk import Client
from pycontainerd.client.blocking import Cancel, NotStarted, get_blob_blocking
from pycontainerd.client.oci import Platform
from pycontainerd.client.pull import Progress, pull
from pycontainerd.client.registry import Registry, RegistryHost
from pycontainerd.errdefs import AlreadyExists, InvalidArgument

if TYPE_CHECKING:
    from collections.abc import Sequence

    import grpc.aio

    from pycontainerd.api.services.pull.v1 import pull_pb2
    from pycontainerd.api.types import mount_pb2
    from pycontainerd.client.images import Image
    from pycontainerd.client.oci import Descriptor
    from pycontainerd.client.pull import ProgressFn
    from pycontainerd.client.reference import Reference
    from pycontainerd.content.metadata import NamespacedContentStore
    from pycontainerd.content.writer import ContentWriter
    from pycontainerd.transfer.staging import Speculation, Stager

__all__ = ["DaemonPull"]

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 16
PROGRESS_BYTES = 2 << 20  # bytes between two byte counts of one blob


def _unpackable(media_type: str) -> bool:
    try:
        compression_for_media_type(media_type)
    except UnsupportedMediaType:
        return False
    return True


class DaemonPull:
    """Pulls for the Pull service, over the daemon's content store and its own API."""

    def __init__(self, content: NamespacedContentStore, stager: Stager, address: str) -> None:
        self._content = content
        self._stager = stager
        self._address = address
        self._channel: grpc.aio.Channel | None = None

    def attach(self, channel: grpc.aio.Channel | None) -> None:
        """The channel to the daemon's services (None: its socket)."""
        self._channel = channel

    async def pull(self, req: pull_pb2.PullRequest, report: ProgressFn) -> Image:
        ns = namespaces.namespace_required()
        if not req.reference:
            raise InvalidArgument("reference must not be empty")
        hosts = {
            h.host: RegistryHost(
                insecure=h.insecure, ca_pem=h.ca_pem, username=h.username, password=h.password
            )
            for h in req.hosts
        }
        platform = None
        if req.HasField("platform"):
            p = req.platform
            platform = Platform(p.os, p.architecture, p.variant)
        registry = Registry(hosts)
        run = _Run(self._content, self._stager, registry, ns, req.unpack, report)
        client = Client(self._address, ns, channel=self._channel)
        lease = namespaces.lease()
        try:
            with client.using_lease(lease) if lease else contextlib.nullcontext():
                return await pull(
                    client,
                    req.reference,
                    registry,
                    platform=platform,
                    unpack_image=req.unpack,
                    snapshotter=req.snapshotter or None,
                    concurrency=min(MAX_CONCURRENCY, req.concurrency or 4),
                    progress=report,
                    in_daemon=False,
                    fetcher=run.fetch,
                    applier=run.apply,
                )
        finally:
            await run.discard()
            if self._channel is None:
                await client.close()


class _Run:
    """One pull's staged layers."""

    def __init__(
        self,
        content: NamespacedContentStore,
        stager: Stager,
        registry: Registry,
        namespace: str,
        unpack: bool,
        report: ProgressFn,
    ) -> None:
        self._report = report
        self._content = content
        self._stager = stager
        self._registry = registry
        self._ns = namespace
        self._unpack = unpack
        self._staged: set[str] = set()
        self._seen: set[str] = set()

    async def fetch(self, ref: Reference, desc: Descriptor, report: ProgressFn) -> bool:
        if desc.digest in self._seen:
            return False  # a layer listed twice: the ordinary path waits for the first
        self._seen.add(desc.digest)
        # The content store reads the namespace and lease of the "request".
        namespaces.current_namespace.set(self._ns)
        namespaces.current_lease.set(Client.current_lease())
        try:
            w = await self._content.writer(f"layer-{desc.digest}", desc.size, desc.digest)
        except AlreadyExists:
            report(Progress("done", desc.digest, desc.size, desc.size))
            return True
        spec: Speculation | None = None
        try:
            if not w.fresh:
                return False  # resumed or shared: the SDK continues it
            report(Progress("start", desc.digest, 0, desc.size))
            if self._unpack and _unpackable(desc.media_type):
                spec = await self._stager.speculate(b"", w.data_path, wanted=True)
            try:
                size = await self._fetch_blocking(ref, desc, w, report)
            except NotStarted:
                size = await self._fetch_async(ref, desc, w, report)
            report(Progress("bytes", desc.digest, size, desc.size))
            try:
                digest = await w.commit(desc.size, desc.digest)
            except AlreadyExists:
                digest = desc.digest  # committed meanwhile (another pull): the same bytes
            if spec is not None:
                spec.finish(digest, size)
                spec = None
                self._staged.add(digest)
            report(Progress("done", desc.digest, desc.size, desc.size))
            return True
        finally:
            if spec is not None:
                spec.cancel()
            await w.close()

    async def _fetch_blocking(
        self, ref: Reference, desc: Descriptor, w: ContentWriter, report: ProgressFn
    ) -> int:
        """The body read, hashed and written by a worker thread (client.blocking)."""
        get = self._registry.blob_get(ref, desc)
        loop = asyncio.get_running_loop()
        done = reported = 0

        def sink(view: memoryview) -> None:
            nonlocal done, reported
            w.append_sync(view)
            done += len(view)
            if done - reported >= PROGRESS_BYTES:
                reported = done
                loop.call_soon_threadsafe(report, Progress("bytes", desc.digest, done, desc.size))

        cancel = Cancel()
        work = asyncio.ensure_future(asyncio.to_thread(get_blob_blocking, get, sink, cancel))
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            cancel.set()  # the thread stops at its next read; the ingest keeps what it wrote
            with contextlib.suppress(BaseException):
                await work
            raise

    async def _fetch_async(
        self, ref: Reference, desc: Descriptor, w: ContentWriter, report: ProgressFn
    ) -> int:
        """The body through the asyncio client (which words every failure)."""
        offset = reported = 0
        async for chunk in self._registry.fetch_blob(ref, desc, 0):
            await w.write_at(offset, chunk)
            offset += len(chunk)
            if offset - reported >= PROGRESS_BYTES:
                reported = offset
                report(Progress("bytes", desc.digest, offset, desc.size))
        return offset

    async def apply(self, desc: Descriptor, mounts: Sequence[mount_pb2.Mount]) -> str | None:
        if desc.digest not in self._staged:
            return None
        self._staged.discard(desc.digest)
        result = await self._stager.adopt(desc.digest, mounts)
        if result is None:
            return None
        self._report(Progress("extracted", desc.digest, desc.size, desc.size))
        return result.digest

    async def discard(self) -> None:
        """Layers staged and not applied (their snapshot existed, or the pull failed)."""
        for digest in self._staged:
            self._stager.drop(digest)
        self._staged.clear()
