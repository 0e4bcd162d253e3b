"""Images: the Images service records, walking their content, and unpacking them.

An ``Image`` is a name plus a target descriptor (a manifest or an index). ``resolve``
walks from the target to the host's manifest and its config; ``unpack`` applies the
layers into a snapshotter the way containerd's client does (``rootfs/apply.go``): one
snapshot per chain ID, ``Prepare`` under a unique ``extract-`` key, ``Diff.Apply``
(whose returned digest must equal the config's diff ID), ``Commit`` under the chain ID.
Then it labels content for the garbage collector: ``containerd.io/uncompressed`` on each
layer and ``containerd.io/gc.ref.snapshot.<snapshotter>`` on the config. Run ``unpack``
inside ``client.lease()`` (``Client.unpack`` does) so nothing is collected midway.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from google.protobuf import field_mask_pb2

from pycontainerd.api.services.diff.v1 import diff_pb2
from pycontainerd.api.services.images.v1 import images_pb2
from pycontainerd.api.services.snapshots.v1 import snapshots_pb2
from pycontainerd.client._client import timestamp_to_datetime
from pycontainerd.client.oci import (
    Descriptor,
    Manifest,
    Platform,
    chain_ids,
    is_index,
    is_manifest,
    parse_index,
    parse_manifest,
    select_platform,
)
from pycontainerd.errdefs import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

if TYPE_CHECKING:
    from collections.abc import Sequence

    from pycontainerd.api.types import mount_pb2
    from pycontainerd.client._client import RawClient
    from pycontainerd.client.content import ContentStore

__all__ = [
    "Image",
    "ImageStore",
    "LayerApplier",
    "ResolvedImage",
    "gc_child_labels",
    "snapshot_exists",
    "unpack",
]

UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
GC_SNAPSHOT_PREFIX = "containerd.io/gc.ref.snapshot."
GC_CONTENT_PREFIX = "containerd.io/gc.ref.content."
MAX_INDEX_DEPTH = 4


@dataclass(frozen=True, slots=True)
class Image:
    name: str
    target: Descriptor
    labels: dict[str, str] = field(default_factory=dict)
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def to_pb(self) -> images_pb2.Image:
        return images_pb2.Image(name=self.name, labels=self.labels, target=self.target.to_pb())

    @classmethod
    def from_pb(cls, pb: images_pb2.Image) -> Image:
        return cls(
            pb.name,
            Descriptor.from_pb(pb.target),
            dict(pb.labels),
            timestamp_to_datetime(pb.created_at),
            timestamp_to_datetime(pb.updated_at),
        )


@dataclass(frozen=True, slots=True)
class ResolvedImage:
    """The host-platform manifest of an image and its decoded config."""

    manifest_desc: Descriptor
    manifest: Manifest
    config: dict[str, Any]

    @property
    def diff_ids(self) -> list[str]:
        rootfs = self.config.get("rootfs") or {}
        ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
        if not isinstance(ids, list) or not all(isinstance(x, str) for x in ids):
            raise InvalidArgument("image config has no rootfs.diff_ids")
        return list(ids)

    @property
    def chain_id(self) -> str:
        return chain_ids(self.diff_ids)[-1]

    @property
    def runtime_config(self) -> dict[str, Any]:
        cfg = self.config.get("config") or {}
        return cfg if isinstance(cfg, dict) else {}


class ImageStore:
    """The Images service plus content walks, bound to one client."""

    def __init__(self, client: RawClient, content: ContentStore) -> None:
        self._c = client
        self._stub = client.images_stub
        self._content = content

    async def get(self, name: str) -> Image:
        resp = await self._c.call(self._stub.Get, images_pb2.GetImageRequest(name=name))
        return Image.from_pb(resp.image)

    async def list(self, *filters: str) -> list[Image]:
        resp = await self._c.call(self._stub.List, images_pb2.ListImagesRequest(filters=filters))
        return [Image.from_pb(i) for i in resp.images]

    async def create(self, image: Image) -> Image:
        resp = await self._c.call(
            self._stub.Create, images_pb2.CreateImageRequest(image=image.to_pb())
        )
        return Image.from_pb(resp.image)

    async def update(self, image: Image, *paths: str) -> Image:
        req = images_pb2.UpdateImageRequest(
            image=image.to_pb(), update_mask=field_mask_pb2.FieldMask(paths=list(paths))
        )
        resp = await self._c.call(self._stub.Update, req)
        return Image.from_pb(resp.image)

    async def put(self, image: Image) -> Image:
        """Create ``image``, or point an existing one with that name at the new target."""
        try:
            return await self.create(image)
        except AlreadyExists:
            paths = ["target", *(f"labels.{k}" for k in image.labels)]
            return await self.update(image, *paths)

    async def delete(self, name: str, *, sync: bool = False) -> None:
        await self._c.call(self._stub.Delete, images_pb2.DeleteImageRequest(name=name, sync=sync))

    async def tag(self, source: str, target: str) -> Image:
        """Give the image ``source`` a second name (replacing what ``target`` named)."""
        img = await self.get(source)
        return await self.put(Image(target, img.target, dict(img.labels)))

    # ------------------------------------------------------------------ content walks

    async def manifest_for(
        self, desc: Descriptor, platform: Platform | None = None
    ) -> tuple[Descriptor, Manifest]:
        """Follow indexes from ``desc`` down to the manifest for ``platform``."""
        for _ in range(MAX_INDEX_DEPTH):
            data = await self._content.read_all(desc.digest)
            if is_index(desc.media_type):
                desc = select_platform(parse_index(data, desc.media_type), platform)
                continue
            if is_manifest(desc.media_type):
                return desc, parse_manifest(data, desc.media_type)
            raise InvalidArgument(f"unsupported media type {desc.media_type!r}")
        raise InvalidArgument("indexes nested too deep")

    async def resolve(self, image: Image, platform: Platform | None = None) -> ResolvedImage:
        desc, manifest = await self.manifest_for(image.target, platform)
        config = await self._content.read_json(manifest.config.digest)
        if not isinstance(config, dict):
            raise InvalidArgument("image config is not a JSON object")
        return ResolvedImage(desc, manifest, config)


async def gc_child_labels(content: ContentStore, desc: Descriptor) -> list[Descriptor]:
    """Label ``desc`` with gc references to its children that exist; return them.

    Index -> ``gc.ref.content.m.<i>``; manifest -> ``gc.ref.content.config`` and
    ``gc.ref.content.l.<i>``, as containerd's ``SetChildrenMappedLabels``.
    """
    data = await content.read_all(desc.digest)
    children: list[tuple[str, Descriptor]] = []
    if is_index(desc.media_type):
        idx = parse_index(data, desc.media_type)
        children = [(f"m.{i}", d) for i, d in enumerate(idx.manifests)]
    elif is_manifest(desc.media_type):
        m = parse_manifest(data, desc.media_type)
        children = [("config", m.config)] + [(f"l.{i}", d) for i, d in enumerate(m.layers)]
    present: list[Descriptor] = []
    labels: dict[str, str] = {}
    for key, child in children:
        if await content.exists(child.digest):
            labels[GC_CONTENT_PREFIX + key] = child.digest
            present.append(child)
    if labels:
        await content.update_labels(desc.digest, labels)
    return present


# Applies a layer onto the mounts of its fresh snapshot another way than Diff.Apply
# (the daemon's pull moves in a layer it unpacked while downloading it): returns the
# layer's diff ID, or None to have Diff.Apply do it.
LayerApplier = Callable[[Descriptor, "Sequence[mount_pb2.Mount]"], Awaitable[str | None]]


async def unpack(
    client: RawClient,
    images: ImageStore,
    image: Image,
    snapshotter: str,
    platform: Platform | None = None,
    applier: LayerApplier | None = None,
) -> str:
    """Apply ``image``'s layers into ``snapshotter``; return the top chain ID."""
    resolved = await images.resolve(image, platform)
    diff_ids = resolved.diff_ids
    layers = resolved.manifest.layers
    if len(diff_ids) != len(layers):
        raise InvalidArgument(
            f"image has {len(layers)} layers but {len(diff_ids)} diff ids in its config"
        )
    content = images._content
    chains = chain_ids(diff_ids)
    parent = ""
    for layer, diff_id, chain in zip(layers, diff_ids, chains, strict=True):
        if not await snapshot_exists(client, snapshotter, chain):
            await _apply_layer(client, snapshotter, layer, diff_id, chain, parent, applier)
        await content.update_labels(layer.digest, {UNCOMPRESSED_LABEL: diff_id})
        parent = chain
    await content.update_labels(
        resolved.manifest.config.digest, {GC_SNAPSHOT_PREFIX + snapshotter: parent}
    )
    return parent


async def snapshot_exists(client: RawClient, snapshotter: str, key: str) -> bool:
    """Whether ``key`` names a snapshot in ``snapshotter`` (of the client's namespace)."""
    try:
        await client.call(
            client.snapshots_stub.Stat,
            snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
        )
    except NotFound:
        return False
    return True


async def _apply_layer(
    client: RawClient,
    snapshotter: str,
    layer: Descriptor,
    diff_id: str,
    chain: str,
    parent: str,
    applier: LayerApplier | None = None,
) -> None:
    key = f"extract-{time.time_ns()}-{secrets.token_hex(4)} {chain}"
    snaps = client.snapshots_stub
    resp = await client.call(
        snaps.Prepare,
        snapshots_pb2.PrepareSnapshotRequest(snapshotter=snapshotter, key=key, parent=parent),
    )
    committed = False
    try:
        digest = await applier(layer, resp.mounts) if applier is not None else None
        if digest is None:
            applied = await client.call(
                client.diff_stub.Apply,
                diff_pb2.ApplyRequest(diff=layer.to_pb(), mounts=list(resp.mounts)),
            )
            digest = applied.applied.digest
        if digest != diff_id:
            raise FailedPrecondition(
                f"wrong diff id {digest} calculated on extraction of "
                f"{layer.digest}, expected {diff_id}"
            )
        try:
            await client.call(
                snaps.Commit,
                snapshots_pb2.CommitSnapshotRequest(snapshotter=snapshotter, name=chain, key=key),
            )
            committed = True
        except AlreadyExists:
            pass  # another unpack of the same layer won the race; its snapshot is as good
    finally:
        if not committed:
            with contextlib.suppress(NotFound, FailedPrecondition):
                await client.call(
                    snaps.Remove,
                    snapshots_pb2.RemoveSnapshotRequest(snapshotter=snapshotter, key=key),
                )
