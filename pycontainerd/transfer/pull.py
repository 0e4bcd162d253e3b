"""The daemon's own pull: registry to disk without a client in between, layers unpacked
while they download.

It runs the client SDK's pull (``pycontainerd.client.pull``) inside the daemon, over
the in-process channel, so leases, resume, gc labels, image records and events are the
same as for any client's pull. Two hooks change how layers move:

- ``fetch``: a layer's bytes go from the registry into its content ingest on a stager
  thread that unpacks them at the same time into a staging directory
  (:mod:`.staging`); the layer is committed as usual, digest verified;
- ``apply``: when the unpack reaches that layer, its staging directory is moved into the
  fresh snapshot instead of Diff.Apply reading the blob back.

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
from pycontainerd.client.oci import Platform
from pycontainerd.client.pull import Progress, pull
from pycontainerd.client.registry import Registry, RegistryHost
from pycontainerd.errdefs import AlreadyExists, InvalidArgument

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Sequence

    import grpc.aio

    from pycontainerd.api.services.pull.v1 import pull_pb2
    from pycontainerd.api.types import mount_pb2
    from pycontainerd.client.images import Image
    from pycontainerd.client.oci import Descriptor
    from pycontainerd.client.pull import ProgressFn
    from pycontainerd.client.reference import Reference
    from pycontainerd.content.metadata import NamespacedContentStore
    from pycontainerd.transfer.staging import StagedLayer, Stager

__all__ = ["DaemonPull"]

log = logging.getLogger(__name__)

MAX_CONCURRENCY = 16


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
        self._staged: dict[str, StagedLayer] = {}
        self._seen: set[str] = set()

    async def fetch(self, ref: Reference, index: int, desc: Descriptor, report: ProgressFn) -> bool:
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
        try:
            if not w.fresh:
                return False  # resumed or shared: the SDK continues it
            layer = self._stager.new(desc.digest, overlay=index > 0)
            report(Progress("start", desc.digest, 0, desc.size))
            unpack = self._unpack and _unpackable(desc.media_type)
            try:
                await self._stager.stream(
                    layer, self._chunks(ref, desc, report), w.append_sync, unpack
                )
                with contextlib.suppress(AlreadyExists):
                    await w.commit(desc.size, desc.digest)
            except BaseException:
                await asyncio.to_thread(layer.discard)
                raise
            if layer.result is not None:
                self._staged[desc.digest] = layer
            else:
                await asyncio.to_thread(layer.discard)
            report(Progress("done", desc.digest, desc.size, desc.size))
            return True
        finally:
            await w.close()

    async def apply(self, desc: Descriptor, mounts: Sequence[mount_pb2.Mount]) -> str | None:
        layer = self._staged.pop(desc.digest, None)
        if layer is None or layer.result is None:
            return None
        if await asyncio.to_thread(layer.adopt, mounts):
            self._report(Progress("extracted", desc.digest, desc.size, desc.size))
            return layer.result.digest
        await asyncio.to_thread(layer.discard)
        return None

    async def discard(self) -> None:
        left, self._staged = list(self._staged.values()), {}
        for layer in left:
            await asyncio.to_thread(layer.discard)

    async def _chunks(
        self, ref: Reference, desc: Descriptor, report: ProgressFn
    ) -> AsyncGenerator[bytes, None]:
        done = 0
        async for chunk in self._registry.fetch_blob(ref, desc, 0):
            done += len(chunk)
            yield chunk
            report(Progress("bytes", desc.digest, done, desc.size))
