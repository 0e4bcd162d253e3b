"""Import and export image archives: OCI image layouts and ``docker save`` tars.

Import scans the tar's headers once in a thread (tarfile as a header parser only; no
member is ever extracted to disk), then streams each member's bytes from its offset in
the file into the Content service. Members under ``blobs/sha256/`` are committed with
their name as the expected digest, so the daemon verifies every byte; the small JSON
members (``index.json``, ``oci-layout``, ``manifest.json``, configs) are read with a
20 MiB bound (CVE-2023-25153). A Docker archive gets a Docker schema 2 manifest built
from its ``manifest.json``, with layer digests as the daemon computed them.

Export writes an OCI image layout tar with headers made by ``tarfile`` and blob bytes
streamed from ``Content.Read``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import aiofiles

from pycontainerd.client.content import CHUNK, MAX_JSON
from pycontainerd.client.images import Image, gc_child_labels
from pycontainerd.client.oci import (
    ANNOTATION_IMAGE_NAME,
    ANNOTATION_REF_NAME,
    MT_DOCKER_CONFIG,
    MT_DOCKER_LAYER,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    Descriptor,
    is_index,
    is_manifest,
    parse_index,
    parse_manifest,
    sha256_digest,
)
from pycontainerd.client.reference import normalize
from pycontainerd.errdefs import InvalidArgument, NotFound

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from pycontainerd.client.content import ContentStore
    from pycontainerd.client.images import ImageStore

__all__ = ["export_archive", "import_archive"]


@dataclass(frozen=True, slots=True)
class _Member:
    name: str
    offset: int
    size: int


def _scan(path: Path) -> dict[str, _Member]:
    """Regular-file members by normalized name (later entries win, as tar extraction would)."""
    out: dict[str, _Member] = {}
    with path.open("rb") as f:
        if f.read(2) == b"\x1f\x8b":
            raise InvalidArgument(f"{path}: compressed archives are not supported, gunzip first")
        f.seek(0)
        try:
            with tarfile.open(fileobj=f, mode="r:") as tf:
                for m in tf:
                    if m.isreg() and not m.issparse():
                        name = str(PurePosixPath("/", m.name))[1:]
                        out[name] = _Member(name, m.offset_data, m.size)
        except tarfile.TarError as exc:
            raise InvalidArgument(f"{path}: not a tar archive: {exc}") from exc
    return out


def _file_source(path: Path, member: _Member) -> Any:
    async def source(offset: int) -> AsyncIterator[bytes]:
        async with aiofiles.open(path, "rb") as f:
            await f.seek(member.offset + offset)
            left = member.size - offset
            while left > 0:
                chunk = await f.read(min(CHUNK, left))
                if not chunk:
                    raise InvalidArgument(f"archive member {member.name} is truncated")
                left -= len(chunk)
                yield chunk

    return source


async def _read_member(path: Path, member: _Member) -> bytes:
    if member.size > MAX_JSON:
        raise InvalidArgument(f"{member.name} is {member.size} bytes, over the {MAX_JSON} limit")
    buf = bytearray()
    async for chunk in _file_source(path, member)(0):
        buf += chunk
    return bytes(buf)


async def _load_json(path: Path, members: dict[str, _Member], name: str) -> Any:
    member = members.get(name)
    if member is None:
        raise InvalidArgument(f"archive has no {name}")
    try:
        return json.loads(await _read_member(path, member))
    except ValueError as exc:
        raise InvalidArgument(f"{name}: {exc}") from exc


async def import_archive(
    content: ContentStore,
    images: ImageStore,
    path: Path,
    *,
    base_name: str = "",
    index_name: str = "",
) -> list[Image]:
    """Import an OCI layout or Docker archive; return the images created (or updated).

    Call inside a lease. An OCI entry is named by its ``io.containerd.image.name``
    annotation, else its ``org.opencontainers.image.ref.name`` (a full reference, or a
    tag appended to ``base_name``); entries without a usable name are skipped.
    ``index_name`` also names the whole archive index (stored as a blob).
    """
    members = await asyncio.to_thread(_scan, Path(path))
    if "manifest.json" in members and "index.json" not in members:
        return await _import_docker(content, images, Path(path), members)
    for name, member in members.items():
        parts = name.split("/")
        if len(parts) == 3 and parts[0] == "blobs" and parts[1] == "sha256":
            digest = "sha256:" + parts[2]
            await content.ingest(
                f"tar-{name}",
                _file_source(Path(path), member),
                expected=digest,
                size=member.size,
            )
    index_data = await _read_member(Path(path), members.get("index.json") or _missing())
    idx = parse_index(index_data, MT_OCI_INDEX)
    created: list[Image] = []
    for desc in idx.manifests:
        await _label_tree(content, desc)
        name = desc.annotations.get(ANNOTATION_IMAGE_NAME, "")
        if not name:
            ref = desc.annotations.get(ANNOTATION_REF_NAME, "")
            if ref and ("/" in ref or ":" in ref or "@" in ref):
                name = ref
            elif ref and base_name:
                name = f"{base_name}:{ref}"
        if name:
            target = Descriptor(desc.media_type, desc.digest, desc.size)
            created.append(await images.put(Image(name, target)))
    if index_name:
        digest = sha256_digest(index_data)
        await content.ingest("tar-index.json", index_data, expected=digest, size=len(index_data))
        target = Descriptor(MT_OCI_INDEX, digest, len(index_data))
        await _label_tree(content, target)
        created.append(await images.put(Image(index_name, target)))
    return created


def _missing() -> _Member:
    raise InvalidArgument("archive has neither index.json nor manifest.json")


async def _label_tree(content: ContentStore, desc: Descriptor, depth: int = 0) -> None:
    """Check the manifests an entry names are present, and set gc labels down the tree."""
    if not is_index(desc.media_type) and not is_manifest(desc.media_type):
        raise InvalidArgument(f"unsupported media type {desc.media_type!r} in index")
    if not await content.exists(desc.digest):
        raise NotFound(f"archive lacks blob {desc.digest} named by its index")
    if depth > 4:
        raise InvalidArgument("indexes nested too deep")
    for child in await gc_child_labels(content, desc):
        if is_index(child.media_type) or is_manifest(child.media_type):
            await _label_tree(content, child, depth + 1)


async def _import_docker(
    content: ContentStore, images: ImageStore, path: Path, members: dict[str, _Member]
) -> list[Image]:
    doc = await _load_json(path, members, "manifest.json")
    if not isinstance(doc, list):
        raise InvalidArgument("manifest.json is not a list")
    created: list[Image] = []
    for entry in doc:
        if not isinstance(entry, dict) or not isinstance(entry.get("Layers"), list):
            raise InvalidArgument("manifest.json entry lacks Layers")
        config = await _read_member(path, members.get(str(entry.get("Config"))) or _missing())
        layers = [await _ingest_unknown(content, path, members, str(n)) for n in entry["Layers"]]
        cfg = Descriptor(MT_DOCKER_CONFIG, sha256_digest(config), len(config))
        await content.ingest("tar-config", config, expected=cfg.digest, size=cfg.size)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": MT_DOCKER_MANIFEST,
                "config": cfg.to_json(),
                "layers": [d.to_json() for d in layers],
            },
            separators=(",", ":"),
        ).encode()
        target = Descriptor(MT_DOCKER_MANIFEST, sha256_digest(manifest), len(manifest))
        await content.ingest("tar-manifest", manifest, expected=target.digest, size=target.size)
        await gc_child_labels(content, target)
        for tag in entry.get("RepoTags") or []:
            created.append(await images.put(Image(normalize(str(tag)), target)))
    return created


async def _ingest_unknown(
    content: ContentStore, path: Path, members: dict[str, _Member], name: str
) -> Descriptor:
    """A layer whose digest the archive does not state: hash it first, then ingest."""
    member = members.get(str(PurePosixPath("/", name))[1:])
    if member is None:
        raise InvalidArgument(f"archive lacks layer {name}")
    digest, magic = await asyncio.to_thread(_hash_member, path, member)
    await content.ingest(
        f"tar-{digest}", _file_source(path, member), expected=digest, size=member.size
    )
    media = MT_DOCKER_LAYER + (".gzip" if magic[:2] == b"\x1f\x8b" else "")
    if magic == b"\x28\xb5\x2f\xfd":
        media = "application/vnd.oci.image.layer.v1.tar+zstd"
    return Descriptor(media, digest, member.size)


def _hash_member(path: Path, member: _Member) -> tuple[str, bytes]:
    """The member's digest and its first bytes (compression magic)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(member.offset)
        magic = f.read(min(4, member.size))
        f.seek(member.offset)
        left = member.size
        while left:
            chunk = f.read(min(CHUNK, left))
            if not chunk:
                raise InvalidArgument(f"archive member {member.name} is truncated")
            h.update(chunk)
            left -= len(chunk)
    return "sha256:" + h.hexdigest(), magic


# ---------------------------------------------------------------------------- export


def _header(name: str, size: int, directory: bool = False) -> bytes:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o755 if directory else 0o444
    ti.type = tarfile.DIRTYPE if directory else tarfile.REGTYPE
    return ti.tobuf(format=tarfile.PAX_FORMAT)


async def _reachable(content: ContentStore, desc: Descriptor, out: dict[str, Descriptor]) -> None:
    if desc.digest in out:
        return
    if not await content.exists(desc.digest):
        if is_index(desc.media_type) or is_manifest(desc.media_type) or not out:
            return  # a platform we never fetched: skipped, as a platform-filtered export does
        raise NotFound(f"blob {desc.digest} of an exported image is missing")
    out[desc.digest] = desc
    if is_index(desc.media_type):
        idx = parse_index(await content.read_all(desc.digest), desc.media_type)
        for child in idx.manifests:
            await _reachable(content, child, out)
    elif is_manifest(desc.media_type):
        m = parse_manifest(await content.read_all(desc.digest), desc.media_type)
        for child in (m.config, *m.layers):
            await _reachable(content, child, out)


async def export_archive(
    content: ContentStore, images: Sequence[Image], path: Path
) -> dict[str, Any]:
    """Write ``images`` as an OCI image layout tar at ``path``; return its index.json."""
    blobs: dict[str, Descriptor] = {}
    entries = []
    for img in images:
        await _reachable(content, img.target, blobs)
        d = img.target.to_json()
        tag = img.name.rsplit("/", 1)[-1]
        d["annotations"] = {
            ANNOTATION_IMAGE_NAME: img.name,
            ANNOTATION_REF_NAME: tag.split(":", 1)[1] if ":" in tag else img.name,
        }
        entries.append(d)
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}
    index_bytes = json.dumps(index, separators=(",", ":")).encode()
    layout = b'{"imageLayoutVersion":"1.0.0"}'
    async with aiofiles.open(path, "wb") as f:
        await f.write(_header("oci-layout", len(layout)) + _pad(layout))
        await f.write(_header("index.json", len(index_bytes)) + _pad(index_bytes))
        await f.write(_header("blobs", 0, True) + _header("blobs/sha256", 0, True))
        for digest in sorted(blobs):
            desc = blobs[digest]
            await f.write(_header("blobs/sha256/" + digest[7:], desc.size))
            written = 0
            async for chunk in content.read(digest):
                await f.write(chunk)
                written += len(chunk)
            if written != desc.size:
                raise InvalidArgument(f"blob {digest}: read {written} of {desc.size} bytes")
            await f.write(b"\0" * (-written % tarfile.BLOCKSIZE))
        await f.write(b"\0" * (2 * tarfile.BLOCKSIZE))
    return index


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)
