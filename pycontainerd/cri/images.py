"""Images as the CRI sees them: ids, tags and repo digests over the k8s.io image records.

A CRI image id is the digest of the image config, and one image may have many records
(``repo:tag`` names and ``repo@sha256:…`` repo digests). ``ImageCatalog`` resolves each
record's target once (cached by target digest: manifests are immutable) to its config
digest, size, user and runtime config, and answers lookups by name (normalized the way
kubelet's references are: ``busybox`` is ``docker.io/library/busybox:latest``), by id or
id prefix, and by repo digest. ``pull`` fetches into the k8s.io namespace with per-host
insecure (HTTP) settings and the request's credentials, and records the repo digest too.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pycontainerd.client import Image, Registry, RegistryHost
from pycontainerd.client.reference import parse
from pycontainerd.errdefs import InvalidArgument, NotFound, PycdError

if TYPE_CHECKING:
    from pycontainerd.client import Client

__all__ = ["ImageCatalog", "ImageInfo", "normalize_ref"]

log = logging.getLogger(__name__)


def normalize_ref(ref: str) -> str:
    return str(parse(ref))


@dataclass(slots=True)
class _Resolved:
    id: str
    size: int
    config: dict[str, Any]


@dataclass(slots=True)
class ImageInfo:
    id: str
    size: int
    config: dict[str, Any]  # the runtime config ("config" of the image config)
    repo_tags: list[str] = field(default_factory=list)
    repo_digests: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        """What kubelet reports as imageRef: a repo digest, else the id."""
        return self.repo_digests[0] if self.repo_digests else self.id

    @property
    def user(self) -> str:
        return str(self.config.get("User") or "")


class ImageCatalog:
    def __init__(self, client: Client, snapshotter: str, insecure: tuple[str, ...] = ()) -> None:
        self._c = client
        self._snapshotter = snapshotter
        self._insecure = set(insecure)
        self._by_target: dict[str, _Resolved] = {}
        # The last listing, while no image event said otherwise (``invalidate``): kubelet
        # asks ImageStatus for every pod it syncs, and each answer listed every image.
        self._listing: list[ImageInfo] | None = None
        self._generation = 0

    async def _resolve(self, img: Image) -> _Resolved:
        cached = self._by_target.get(img.target.digest)
        if cached is None:
            r = await self._c.images.resolve(img)
            size = sum(layer.size for layer in r.manifest.layers)
            cached = _Resolved(r.manifest.config.digest, size, r.runtime_config)
            self._by_target[img.target.digest] = cached
        return cached

    async def _list(self) -> list[ImageInfo]:
        by_id: dict[str, ImageInfo] = {}
        for img in await self._c.list_images():
            try:
                r = await self._resolve(img)
            except PycdError as exc:
                # A half-pulled or foreign-platform record is not a CRI image.
                log.debug("image %s skipped: %s", img.name, exc)
                continue
            info = by_id.setdefault(r.id, ImageInfo(r.id, r.size, r.config))
            info.names.append(img.name)
            if img.name.startswith("sha256:"):
                continue
            if "@" in img.name:
                if img.name not in info.repo_digests:
                    info.repo_digests.append(img.name)
                continue
            info.repo_tags.append(img.name)
            with contextlib.suppress(InvalidArgument):
                digest = f"{parse(img.name).name}@{img.target.digest}"
                if digest not in info.repo_digests:
                    info.repo_digests.append(digest)
        return list(by_id.values())

    def invalidate(self) -> None:
        """Images changed: the next listing asks the daemon again."""
        self._generation += 1
        self._listing = None

    async def list(self) -> list[ImageInfo]:
        """Every image, one entry per id, with all its names (callers must not change
        the entries: they are shared until the next image event)."""
        if self._listing is not None:
            return self._listing
        generation = self._generation
        listing = await self._list()
        if generation == self._generation:  # no image event arrived meanwhile
            self._listing = listing
        return listing

    async def find(self, ref: str) -> ImageInfo:
        """The image named, identified (full or unique prefix of the id) or digested by
        ``ref``; NotFound otherwise."""
        images = await self.list()
        candidates: list[str] = [ref]
        with contextlib.suppress(InvalidArgument):
            candidates.append(normalize_ref(ref))
        for info in images:
            if any(c in info.names or c in info.repo_digests for c in candidates):
                return info
        hexpart = ref.removeprefix("sha256:")
        if hexpart and all(ch in "0123456789abcdef" for ch in hexpart):
            hits = [i for i in images if i.id.removeprefix("sha256:").startswith(hexpart)]
            if len(hits) == 1:
                return hits[0]
        raise NotFound(f"image {ref!r}")

    async def pull(
        self, ref: str, username: str = "", password: str = "", auth: str = ""
    ) -> ImageInfo:
        name = normalize_ref(ref)
        parsed = parse(name)
        if auth and not username:
            try:
                username, _, password = base64.b64decode(auth).decode().partition(":")
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidArgument("auth is not base64 of user:password") from exc
        insecure = parsed.host in self._insecure or parsed.host.rsplit(":", 1)[0] in self._insecure
        host = RegistryHost(insecure=insecure, username=username, password=password)
        registry = Registry({parsed.host: host})
        img = await self._c.pull(name, registry, snapshotter=self._snapshotter)
        digest_name = f"{parsed.name}@{img.target.digest}"
        if digest_name != name:
            await self._c.images.put(Image(digest_name, img.target, dict(img.labels)))
        self.invalidate()  # our own change: seen at once, not when its event arrives
        return await self.find(name)

    async def remove(self, ref: str) -> None:
        """Remove every record of the image ``ref`` names; quiet when there is none."""
        try:
            info = await self.find(ref)
        except NotFound:
            return
        for name in info.names:
            with contextlib.suppress(NotFound):
                await self._c.remove_image(name)
        self._by_target = {k: v for k, v in self._by_target.items() if v.id != info.id}
        self.invalidate()

    async def ensure(self, ref: str) -> ImageInfo:
        """The local image, pulled when missing (the sandbox image)."""
        try:
            return await self.find(ref)
        except NotFound:
            return await self.pull(ref)

    async def fs_usage(self, root: str) -> tuple[int, int]:
        """(bytes, inodes) used under the snapshotter root ``root``."""
        return await asyncio.to_thread(_du, root)


def _du(root: str) -> tuple[int, int]:
    used = inodes = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            inodes += 1
            used += st.st_blocks * 512
    return used, inodes
