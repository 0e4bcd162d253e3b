"""Build container images offline for tests: layers, configs, manifests and archives.

Tests have no registry, so they make their own images. A `Layer` is a list of tar entries
(files, dirs, links, devices, fifos, xattrs, OCI whiteouts) serialized deterministically;
an `Image` turns layers plus a config into OCI or Docker manifests; an `ImageIndex` groups
per-platform images. `write_oci_archive` and `write_docker_archive` write the tar files
`ctr images import` reads (containerd's images/archive/importer.go). `busybox_image()`,
`feature_image()` and `multi_platform_index()` are ready-made fixtures, and
`expected_tree()` computes the merged filesystem of an image's layers by applying the
entry lists in pure Python with OCI whiteout semantics, for comparison with
`tests.support.fs_listing.listing` of a mounted image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform as _platform
import tarfile
from dataclasses import dataclass, field
from functools import cache, cached_property
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Literal

import zstandard

from tests.support.fs_listing import Entry, EntryType, link_groups

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "BUSYBOX",
    "DEFAULT_MTIME",
    "DEFAULT_PATH_ENV",
    "Compression",
    "Flavor",
    "Image",
    "ImageIndex",
    "Layer",
    "LayerBlob",
    "Platform",
    "TarEntry",
    "busybox_image",
    "chain_id",
    "compress",
    "decompress",
    "expected_tree",
    "feature_image",
    "host_platform",
    "multi_platform_index",
    "oci_ref_name",
    "sha256_digest",
    "write_docker_archive",
    "write_oci_archive",
]

Compression = Literal["gzip", "zstd", "none"]
Flavor = Literal["oci", "docker"]
EntryKind = Literal[
    "file", "dir", "symlink", "hardlink", "char", "block", "fifo", "whiteout", "opaque"
]

DEFAULT_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z
DEFAULT_CREATED = "2023-11-14T22:13:20Z"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
WHITEOUT_PREFIX = ".wh."
OPAQUE_WHITEOUT = ".wh..wh..opq"

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA_TYPES: dict[Flavor, dict[Compression, str]] = {
    "oci": {
        "none": "application/vnd.oci.image.layer.v1.tar",
        "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
        "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    },
    # Docker's schema has no zstd layer type.
    "docker": {
        "none": "application/vnd.docker.image.rootfs.diff.tar",
        "gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    },
}
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def chain_id(diff_ids: Sequence[str]) -> str:
    """The snapshot key containerd's unpacker commits a layer stack under."""
    chain = diff_ids[0]
    for d in diff_ids[1:]:
        chain = sha256_digest(f"{chain} {d}".encode())
    return chain


def _json(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=6, mtime=0)  # mtime=0: deterministic bytes
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3, write_content_size=True).compress(data)
    return data


def decompress(blob: bytes) -> bytes:
    """Undo gzip or zstd by magic number; anything else is returned as is."""
    if blob[:2] == b"\x1f\x8b":
        return gzip.decompress(blob)
    if blob[:4] == b"\x28\xb5\x2f\xfd":
        return zstandard.ZstdDecompressor().decompress(blob, max_output_size=1 << 31)
    return blob


def _norm(path: str) -> str:
    p = PurePosixPath("/" + path.lstrip("/"))
    if ".." in p.parts:
        raise ValueError(f"path {path!r} escapes the root")
    rel = str(p).lstrip("/")
    if not rel:
        raise ValueError("the root itself cannot be an entry")
    return rel


@dataclass(frozen=True, slots=True)
class TarEntry:
    """One entry of a layer. `path` is relative to the root, without a leading slash.

    For `whiteout`, `path` is the path being deleted (written as `<dir>/.wh.<name>`); for
    `opaque`, `path` is the directory whose lower contents are hidden. `target` is the
    symlink target, or the hardlink's target path (which must be earlier in the layer).
    `mtime` may be fractional (written as a PAX record).
    """

    path: str
    kind: EntryKind
    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float = DEFAULT_MTIME
    target: str = ""
    rdev: tuple[int, int] = (0, 0)
    xattrs: tuple[tuple[str, str], ...] = ()

    @property
    def tar_name(self) -> str:
        if self.kind == "whiteout":
            p = PurePosixPath(self.path)
            return str(p.parent / (WHITEOUT_PREFIX + p.name)).removeprefix("./")
        if self.kind == "opaque":
            return f"{self.path}/{OPAQUE_WHITEOUT}"
        return self.path


_TAR_TYPES: dict[EntryKind, bytes] = {
    "file": tarfile.REGTYPE,
    "whiteout": tarfile.REGTYPE,
    "opaque": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}


@dataclass(frozen=True, slots=True)
class LayerBlob:
    """A layer as stored: compressed bytes, their digest and size, and the diff_id."""

    compression: Compression
    data: bytes
    digest: str
    diff_id: str

    @property
    def size(self) -> int:
        return len(self.data)

    def media_type(self, flavor: Flavor = "oci") -> str:
        try:
            return LAYER_MEDIA_TYPES[flavor][self.compression]
        except KeyError:
            raise ValueError(f"{flavor} images have no {self.compression} layer type") from None

    def descriptor(self, flavor: Flavor = "oci") -> dict[str, Any]:
        return {"mediaType": self.media_type(flavor), "digest": self.digest, "size": self.size}


class Layer:
    """A layer under construction: add entries with the fluent methods, then serialize.

    The tar is PAX format with empty user/group names, so the same entries always give the
    same bytes (and so the same diff_id and digests).
    """

    def __init__(self, *entries: TarEntry, comment: str = "") -> None:
        self.entries: list[TarEntry] = []
        self.comment = comment
        self._tar: bytes | None = None
        self._blobs: dict[Compression, LayerBlob] = {}
        for e in entries:
            self.add(e)

    def add(self, entry: TarEntry) -> Layer:
        self.entries.append(entry)
        self._tar = None
        self._blobs.clear()
        return self

    def file(
        self,
        path: str,
        data: bytes = b"",
        *,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        mtime: float = DEFAULT_MTIME,
        xattrs: Mapping[str, str] | None = None,
    ) -> Layer:
        xa = tuple(sorted((xattrs or {}).items()))
        return self.add(TarEntry(_norm(path), "file", data, mode, uid, gid, mtime, xattrs=xa))

    def dir(
        self,
        path: str,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        mtime: float = DEFAULT_MTIME,
        xattrs: Mapping[str, str] | None = None,
    ) -> Layer:
        xa = tuple(sorted((xattrs or {}).items()))
        return self.add(TarEntry(_norm(path), "dir", b"", mode, uid, gid, mtime, xattrs=xa))

    def dirs(self, *paths: str, mode: int = 0o755) -> Layer:
        for p in paths:
            self.dir(p, mode=mode)
        return self

    def symlink(
        self, path: str, target: str, *, uid: int = 0, gid: int = 0, mtime: float = DEFAULT_MTIME
    ) -> Layer:
        return self.add(TarEntry(_norm(path), "symlink", b"", 0o777, uid, gid, mtime, target))

    def hardlink(self, path: str, target: str) -> Layer:
        return self.add(TarEntry(_norm(path), "hardlink", target=_norm(target)))

    def char_device(
        self, path: str, major: int, minor: int, *, mode: int = 0o666, uid: int = 0, gid: int = 0
    ) -> Layer:
        return self.add(TarEntry(_norm(path), "char", b"", mode, uid, gid, rdev=(major, minor)))

    def block_device(
        self, path: str, major: int, minor: int, *, mode: int = 0o660, uid: int = 0, gid: int = 0
    ) -> Layer:
        return self.add(TarEntry(_norm(path), "block", b"", mode, uid, gid, rdev=(major, minor)))

    def fifo(self, path: str, *, mode: int = 0o644, uid: int = 0, gid: int = 0) -> Layer:
        return self.add(TarEntry(_norm(path), "fifo", b"", mode, uid, gid))

    def whiteout(self, path: str) -> Layer:
        """Delete `path` (and everything below it) of the lower layers."""
        return self.add(TarEntry(_norm(path), "whiteout"))

    def opaque(self, path: str) -> Layer:
        """Hide every lower-layer entry below directory `path`."""
        return self.add(TarEntry(_norm(path), "opaque"))

    def _tarinfo(self, e: TarEntry, by_path: Mapping[str, TarEntry]) -> tarfile.TarInfo:
        src = e
        if e.kind == "hardlink":
            # Writers repeat the target's metadata on the link header; appliers chown,
            # chmod and utime the shared inode with it.
            if e.target not in by_path:
                raise ValueError(f"hardlink {e.path} -> {e.target}: target not in this layer")
            src = by_path[e.target]
        ti = tarfile.TarInfo(e.tar_name)
        ti.type = _TAR_TYPES[e.kind]
        ti.mode = src.mode & 0o7777
        ti.uid, ti.gid = src.uid, src.gid
        ti.uname = ti.gname = ""
        ti.mtime = src.mtime
        ti.size = len(e.data) if e.kind == "file" else 0
        ti.linkname = e.target if e.kind in ("symlink", "hardlink") else ""
        ti.devmajor, ti.devminor = e.rdev
        ti.pax_headers = {f"SCHILY.xattr.{k}": v for k, v in e.xattrs}
        return ti

    def tar_bytes(self) -> bytes:
        if self._tar is None:
            buf = io.BytesIO()
            by_path: dict[str, TarEntry] = {}
            with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
                for e in self.entries:
                    ti = self._tarinfo(e, by_path)
                    tf.addfile(ti, io.BytesIO(e.data) if e.kind == "file" else None)
                    by_path[e.path] = e
            self._tar = buf.getvalue()
        return self._tar

    @property
    def diff_id(self) -> str:
        return sha256_digest(self.tar_bytes())

    def blob(self, compression: Compression = "gzip") -> LayerBlob:
        if compression not in self._blobs:
            data = compress(self.tar_bytes(), compression)
            self._blobs[compression] = LayerBlob(
                compression, data, sha256_digest(data), self.diff_id
            )
        return self._blobs[compression]


@dataclass(frozen=True, slots=True)
class Platform:
    architecture: str
    os: str = "linux"
    variant: str = ""

    def as_json(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def __str__(self) -> str:
        return "/".join(filter(None, (self.os, self.architecture, self.variant)))


_MACHINE_TO_PLATFORM = {
    "x86_64": Platform("amd64"),
    "aarch64": Platform("arm64"),
    "armv7l": Platform("arm", variant="v7"),
    "ppc64le": Platform("ppc64le"),
    "s390x": Platform("s390x"),
    "riscv64": Platform("riscv64"),
}


def host_platform() -> Platform:
    machine = _platform.machine()
    return _MACHINE_TO_PLATFORM.get(machine, Platform(machine))


@dataclass(frozen=True)
class Image:
    """An image: layers (bottom first) plus the config fields ctr and runtimes read.

    `compression` is one value for all layers or one per layer. `flavor` picks OCI or
    Docker media types for the manifest, config and layers. Blobs are computed once and
    cached, so finish building the layers before making the Image.
    """

    layers: tuple[Layer, ...]
    compression: Compression | tuple[Compression, ...] = "gzip"
    flavor: Flavor = "oci"
    platform: Platform = field(default_factory=host_platform)
    env: tuple[str, ...] = (DEFAULT_PATH_ENV,)
    cmd: tuple[str, ...] | None = ("sh",)
    entrypoint: tuple[str, ...] | None = None
    working_dir: str = ""
    user: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    created: str = DEFAULT_CREATED

    def compressions(self) -> tuple[Compression, ...]:
        if isinstance(self.compression, tuple):
            if len(self.compression) != len(self.layers):
                raise ValueError("one compression per layer")
            return self.compression
        return (self.compression,) * len(self.layers)

    @cached_property
    def layer_blobs(self) -> tuple[LayerBlob, ...]:
        return tuple(ly.blob(c) for ly, c in zip(self.layers, self.compressions(), strict=True))

    @property
    def diff_ids(self) -> list[str]:
        return [ly.diff_id for ly in self.layers]

    @property
    def chain_id(self) -> str:
        return chain_id(self.diff_ids)

    @cached_property
    def config_bytes(self) -> bytes:
        cfg: dict[str, Any] = {"Env": list(self.env)}
        if self.entrypoint is not None:
            cfg["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            cfg["Cmd"] = list(self.cmd)
        if self.working_dir:
            cfg["WorkingDir"] = self.working_dir
        if self.user:
            cfg["User"] = self.user
        if self.labels:
            cfg["Labels"] = dict(self.labels)
        doc: dict[str, Any] = {"created": self.created, **self.platform.as_json(), "config": cfg}
        doc["rootfs"] = {"type": "layers", "diff_ids": self.diff_ids}
        doc["history"] = [
            {"created": self.created, "created_by": ly.comment or f"layer {i}"}
            for i, ly in enumerate(self.layers)
        ]
        return _json(doc)

    @property
    def config_descriptor(self) -> dict[str, Any]:
        mt = MT_OCI_CONFIG if self.flavor == "oci" else MT_DOCKER_CONFIG
        data = self.config_bytes
        return {"mediaType": mt, "digest": sha256_digest(data), "size": len(data)}

    @property
    def manifest_media_type(self) -> str:
        return MT_OCI_MANIFEST if self.flavor == "oci" else MT_DOCKER_MANIFEST

    @cached_property
    def manifest_bytes(self) -> bytes:
        return _json(
            {
                "schemaVersion": 2,
                "mediaType": self.manifest_media_type,
                "config": self.config_descriptor,
                "layers": [b.descriptor(self.flavor) for b in self.layer_blobs],
            }
        )

    def descriptor(self, with_platform: bool = False) -> dict[str, Any]:
        data = self.manifest_bytes
        d = {
            "mediaType": self.manifest_media_type,
            "digest": sha256_digest(data),
            "size": len(data),
        }
        if with_platform:
            d["platform"] = self.platform.as_json()
        return d

    def blobs(self) -> dict[str, bytes]:
        """Every blob of the image by digest: manifest, config and layers."""
        out = {sha256_digest(self.manifest_bytes): self.manifest_bytes}
        out[sha256_digest(self.config_bytes)] = self.config_bytes
        out.update({b.digest: b.data for b in self.layer_blobs})
        return out


@dataclass(frozen=True)
class ImageIndex:
    """A multi-platform image: an index (or Docker manifest list) of per-platform images."""

    images: tuple[Image, ...]
    flavor: Flavor = "oci"

    @property
    def media_type(self) -> str:
        return MT_OCI_INDEX if self.flavor == "oci" else MT_DOCKER_LIST

    @cached_property
    def index_bytes(self) -> bytes:
        return _json(
            {
                "schemaVersion": 2,
                "mediaType": self.media_type,
                "manifests": [img.descriptor(with_platform=True) for img in self.images],
            }
        )

    def descriptor(self, with_platform: bool = False) -> dict[str, Any]:
        data = self.index_bytes
        return {"mediaType": self.media_type, "digest": sha256_digest(data), "size": len(data)}

    def blobs(self) -> dict[str, bytes]:
        out = {sha256_digest(self.index_bytes): self.index_bytes}
        for img in self.images:
            out.update(img.blobs())
        return out

    def image_for(self, platform: Platform) -> Image:
        for img in self.images:
            if img.platform == platform:
                return img
        raise KeyError(str(platform))


# ---------------------------------------------------------------------------- archives


class _ArchiveWriter:
    """Deterministic tar of plain files and directories (the outer archive, not a layer)."""

    def __init__(self, path: Path) -> None:
        self._tf = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._dirs: set[str] = set()

    def _mkdirs(self, name: str) -> None:
        parent = PurePosixPath(name).parent
        for p in reversed([parent, *parent.parents]):
            s = str(p)
            if s != "." and s not in self._dirs:
                ti = tarfile.TarInfo(s)
                ti.type, ti.mode, ti.mtime = tarfile.DIRTYPE, 0o755, DEFAULT_MTIME
                self._tf.addfile(ti)
                self._dirs.add(s)

    def add(self, name: str, data: bytes) -> None:
        self._mkdirs(name)
        ti = tarfile.TarInfo(name)
        ti.size, ti.mode, ti.mtime = len(data), 0o644, DEFAULT_MTIME
        self._tf.addfile(ti, io.BytesIO(data))

    def close(self) -> None:
        self._tf.close()


def oci_ref_name(ref: str) -> str:
    """The tag part of a reference, as containerd writes `org.opencontainers.image.ref.name`."""
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ref


def write_oci_archive(
    path: Path,
    images_by_ref: Mapping[str, Image | ImageIndex],
    *,
    annotate: Literal["both", "ref-name", "image-name", "none"] = "both",
    untagged: Iterable[Image | ImageIndex] = (),
) -> dict[str, Any]:
    """Write an OCI image-layout tar; return the parsed index.json.

    Each ref gets one index.json entry (an image manifest, or a nested index for an
    `ImageIndex`) annotated per `annotate`: `io.containerd.image.name` carries the full ref
    (ctr names the image exactly so), `org.opencontainers.image.ref.name` only the tag (ctr
    prefixes it with `--base-name` or `import-<date>`). `untagged` adds entries without
    annotations (importable only through `--index-name` or `--digests`).
    """
    entries: list[dict[str, Any]] = []
    blobs: dict[str, bytes] = {}
    for ref, target in images_by_ref.items():
        desc = target.descriptor(with_platform=isinstance(target, Image))
        ann: dict[str, str] = {}
        if annotate in ("both", "image-name"):
            ann[ANNOTATION_IMAGE_NAME] = ref
        if annotate in ("both", "ref-name"):
            ann[ANNOTATION_REF_NAME] = oci_ref_name(ref)
        if ann:
            desc["annotations"] = ann
        entries.append(desc)
        blobs.update(target.blobs())
    for target in untagged:
        entries.append(target.descriptor(with_platform=isinstance(target, Image)))
        blobs.update(target.blobs())
    index = {"schemaVersion": 2, "mediaType": MT_OCI_INDEX, "manifests": entries}
    w = _ArchiveWriter(path)
    try:
        w.add("oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
        w.add("index.json", _json(index))
        for digest in sorted(blobs):
            algo, hexd = digest.split(":", 1)
            w.add(f"blobs/{algo}/{hexd}", blobs[digest])
    finally:
        w.close()
    return index


def write_docker_archive(
    path: Path,
    repo_tags: Sequence[str],
    image: Image,
    *,
    compressed_layers: bool = False,
) -> list[dict[str, Any]]:
    """Write a classic `docker save` tar (Docker <= 24); return the parsed manifest.json.

    Layout: `<v1id>/{VERSION,json,layer.tar}` per layer, `<config-hex>.json`,
    `manifest.json` ([{Config, RepoTags, Layers}]) and `repositories`. Layers are the
    uncompressed tars, as docker writes them (`compressed_layers` stores the image's
    compressed blobs under the same names, as some other tools do).
    """
    cfg_hex = sha256_digest(image.config_bytes).split(":", 1)[1]
    w = _ArchiveWriter(path)
    layer_names: list[str] = []
    parent = ""
    try:
        for layer, blob in zip(image.layers, image.layer_blobs, strict=True):
            v1id = hashlib.sha256(f"{parent} {layer.diff_id}".encode()).hexdigest()
            v1: dict[str, Any] = {"id": v1id, "created": image.created}
            if parent:
                v1["parent"] = parent
            w.add(f"{v1id}/VERSION", b"1.0")
            w.add(f"{v1id}/json", _json(v1))
            w.add(f"{v1id}/layer.tar", blob.data if compressed_layers else layer.tar_bytes())
            layer_names.append(f"{v1id}/layer.tar")
            parent = v1id
        w.add(f"{cfg_hex}.json", image.config_bytes)
        manifest = [
            {"Config": f"{cfg_hex}.json", "RepoTags": list(repo_tags), "Layers": layer_names}
        ]
        w.add("manifest.json", _json(manifest))
        repos: dict[str, dict[str, str]] = {}
        for tag in repo_tags:
            repo, _, t = tag.rpartition(":")
            repos.setdefault(repo, {})[t] = parent
        w.add("repositories", _json(repos))
    finally:
        w.close()
    return manifest


# ---------------------------------------------------------------------------- model


@dataclass(eq=False)
class _Node:
    """An inode of the model; hardlinked paths share one node."""

    type: EntryType
    mode: int
    uid: int
    gid: int
    mtime_ns: int | None
    data: bytes = b""
    target: str = ""
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()


def _mtime_ns(mtime: float) -> int:
    whole = int(mtime)
    return whole * 1_000_000_000 + round((mtime - whole) * 1_000_000_000)


def _node(e: TarEntry) -> _Node:
    kind: EntryType = "dir" if e.kind == "dir" else "file"
    if e.kind in ("symlink", "char", "block", "fifo"):
        kind = e.kind
    xattrs = tuple(
        (k, v.encode()) for k, v in e.xattrs if k.startswith("user.") and kind in ("file", "dir")
    )
    return _Node(
        type=kind,
        mode=0o777 if kind == "symlink" else e.mode & 0o7777,
        uid=e.uid,
        gid=e.gid,
        mtime_ns=_mtime_ns(e.mtime),
        data=e.data,
        target=e.target if kind == "symlink" else "",
        rdev=e.rdev if kind in ("char", "block") else None,
        xattrs=xattrs,
    )


def _remove(tree: dict[str, _Node], path: str) -> None:
    tree.pop(path, None)
    prefix = path + "/"
    for p in [p for p in tree if p.startswith(prefix)]:
        del tree[p]


def _touch_parent(tree: dict[str, _Node], path: str, listed: set[str]) -> None:
    """Make sure the parents of `path` exist; a parent changed but not listed in the
    layer gets an unknown mtime (adding a child moves it, and nothing restores it)."""
    parent = str(PurePosixPath(path).parent)
    if parent == ".":
        return
    _touch_parent(tree, parent, listed)
    node = tree.get(parent)
    if node is None or node.type != "dir":
        tree[parent] = _Node("dir", 0o755, 0, 0, None)
    elif parent not in listed:
        node.mtime_ns = None


def _apply_layer(tree: dict[str, _Node], layer: Layer) -> None:
    listed = {e.path for e in layer.entries if e.kind == "dir"}
    # Whiteouts only ever hide lower layers, whatever their order in the tar.
    for e in layer.entries:
        if e.kind == "whiteout":
            _remove(tree, e.path)
            _touch_parent(tree, e.path, listed)
        elif e.kind == "opaque":
            prefix = e.path + "/"
            for p in [p for p in tree if p.startswith(prefix)]:
                del tree[p]
            _touch_parent(tree, prefix + OPAQUE_WHITEOUT, listed)
    for e in layer.entries:
        if e.kind in ("whiteout", "opaque"):
            continue
        _touch_parent(tree, e.path, listed)
        old = tree.get(e.path)
        if e.kind == "hardlink":
            _remove(tree, e.path)
            tree[e.path] = tree[e.target]
        elif e.kind == "dir" and old is not None and old.type == "dir":
            tree[e.path] = _node(e)  # a directory header replaces metadata, keeps children
        else:
            _remove(tree, e.path)
            tree[e.path] = _node(e)


def expected_tree(image: Image | Sequence[Layer]) -> dict[str, Entry]:
    """The merged filesystem of the layers, keyed like `fs_listing.listing`.

    Layers are applied bottom first over the entry lists (no tar extraction): whiteouts and
    opaque markers remove lower entries, a non-directory replaces whatever was at its path,
    a directory over a directory updates its metadata only, hardlinks share an inode.
    """
    layers = image.layers if isinstance(image, Image) else tuple(image)
    tree: dict[str, _Node] = {}
    for layer in layers:
        _apply_layer(tree, layer)
    groups = link_groups((p, id(n)) for p, n in tree.items() if n.type != "dir")
    out: dict[str, Entry] = {}
    for path, n in sorted(tree.items()):
        is_file = n.type == "file"
        out[path] = Entry(
            type=n.type,
            mode=n.mode,
            uid=n.uid,
            gid=n.gid,
            size=len(n.data) if is_file else 0,
            sha256=hashlib.sha256(n.data).hexdigest() if is_file else "",
            target=n.target,
            rdev=n.rdev,
            xattrs=tuple(sorted(n.xattrs)),
            mtime_ns=n.mtime_ns,
            link_group=groups.get(path),
        )
    return out


# ---------------------------------------------------------------------------- fixtures

BUSYBOX = Path("/bin/busybox")
BUSYBOX_APPLETS = (
    "sh", "echo", "cat", "ls", "sleep", "true", "false", "id", "env", "httpd", "wc", "head",
    "tail", "ps", "stat", "mkdir", "touch", "rm", "cp", "mv", "ln", "chmod", "grep", "sed",
    "printf", "test", "kill", "hostname", "uname", "pwd", "date", "readlink", "tty", "stty",
    "mount", "nc", "wget", "find", "xargs", "yes", "seq", "sort", "dd", "ip",
)  # fmt: skip
PASSWD = b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
GROUP = b"root:x:0:\nnogroup:x:65534:\n"


def _busybox_base(binary: bytes, comment: str) -> Layer:
    layer = Layer(comment=comment).dirs("bin", "dev", "etc", "proc", "root", "sys", "usr")
    layer.dir("tmp", mode=0o1777).dir("root", mode=0o700).dirs("usr/bin", "var")
    layer.file("bin/busybox", binary, mode=0o755)
    for applet in BUSYBOX_APPLETS:
        layer.symlink(f"bin/{applet}", "busybox")
    return layer.file("etc/passwd", PASSWD).file("etc/group", GROUP)


@cache
def busybox_image(compression: Compression = "gzip", flavor: Flavor = "oci") -> Image:
    """A small realistic image: Debian's static busybox with applet symlinks, for the host."""
    if not BUSYBOX.is_file():
        raise FileNotFoundError("/bin/busybox is missing (apt install busybox-static)")
    layer = _busybox_base(BUSYBOX.read_bytes(), "busybox-static and applets")
    return Image(layers=(layer,), compression=compression, flavor=flavor)


def multi_platform_index(
    platforms: Sequence[Platform] = (
        Platform("amd64"),
        Platform("arm64"),
        Platform("arm", variant="v7"),
    ),
    compression: Compression = "gzip",
    flavor: Flavor = "oci",
) -> ImageIndex:
    """An index of busybox-like images; only the host's carries the real busybox.

    Every image has a second layer with `etc/platform` holding its platform string, so a
    mounted tree shows which manifest was unpacked.
    """
    host = host_platform()
    images = []
    for plat in platforms:
        if plat == host:
            binary = BUSYBOX.read_bytes()
        else:
            binary = f"#!/bin/sh\necho fake busybox for {plat}\n".encode()
        marker = (
            Layer(comment=f"marker {plat}").dir("etc").file("etc/platform", f"{plat}\n".encode())
        )
        images.append(
            Image(
                layers=(_busybox_base(binary, f"busybox for {plat}"), marker),
                compression=compression,
                flavor=flavor,
                platform=plat,
            )
        )
    return ImageIndex(tuple(images), flavor=flavor)


def _pseudo_random(n: int, seed: bytes) -> bytes:
    out = bytearray()
    block = seed
    while len(out) < n:
        block = hashlib.sha256(block).digest()
        out += block
    return bytes(out[:n])


LONG_NAME = "opt/" + "/".join(["a-rather-long-directory-name"] * 4) + "/file-beyond-100-bytes"


def _feature_base() -> Layer:
    ly = Layer(comment="base: every entry kind")
    ly.dirs("bin", "dev", "etc", "home", "opt", "srv", "usr", "usr/bin", "usr/lib", "var")
    ly.dir("tmp", mode=0o1777).dir("srv/shared", mode=0o2775, gid=50)
    ly.dirs("data", "data/sub", "data2", "var/cache", "var/log", "mtime", "home/user")
    ly.dir("data2/attrs", xattrs={"user.dirattr": "on a dir"})
    ly.file("etc/passwd", PASSWD).file("etc/group", GROUP).file("etc/motd", b"hello\n")
    ly.file("etc/to-delete", b"deleted in layer 2\n")
    ly.file("etc/recreated", b"v1\n", mode=0o644)
    ly.file("etc/alt", b"becomes a symlink\n").file("etc/chmodme", b"mode change only\n")
    ly.file("opt/thing", b"a file that becomes a directory\n")
    ly.file("data/old1", b"1").file("data/old2", b"2").file("data/sub/old3", b"3")
    ly.file("data2/keep", b"kept\n", xattrs={"user.foo": "bar", "user.other": "x y z"})
    ly.file("var/cache/c1", b"cache\n").file("var/log/messages", b"log\n")
    ly.file("bin/suid", b"#!/bin/sh\n", mode=0o4755)
    ly.file("bin/sgid", b"#!/bin/sh\n", mode=0o2755, gid=50)
    ly.file("bin/mode0", b"no permissions\n", mode=0o000)
    ly.file("home/user/file", b"user data\n", mode=0o640, uid=1000, gid=1000)
    ly.file("home/nobody", b"nobody\n", uid=65534, gid=65534)
    ly.file("opt/bigid", b"ids beyond ustar\n", uid=3_000_000, gid=3_000_001)
    ly.file("usr/bin/tool", b"#!/bin/sh\necho tool\n", mode=0o755)
    ly.hardlink("usr/bin/tool-alias", "usr/bin/tool").hardlink("usr/bin/tool-2", "usr/bin/tool")
    ly.symlink("usr/bin/rel", "tool").symlink("usr/bin/abs", "/usr/bin/tool")
    ly.symlink("usr/bin/gone-link", "tool").symlink("etc/dangling", "../nonexistent")
    ly.symlink("lib64", "usr/lib", uid=1000, gid=1000)
    ly.char_device("dev/null-copy", 1, 3).block_device("dev/loop-copy", 7, 0, gid=6)
    ly.fifo("dev/fifo", mode=0o600)
    ly.file("mtime/epoch", b"0\n", mtime=0).file("mtime/one", b"1\n", mtime=1)
    ly.file("mtime/y2038", b"2038\n", mtime=2**31).file("mtime/y2100", b"2100\n", mtime=4102444800)
    ly.file("mtime/fraction", b"half\n", mtime=1_700_000_000.5)
    ly.file("opt/empty", b"").file("opt/big", _pseudo_random(300_001, b"big"), mode=0o600)
    ly.file("opt/with space", b"space\n").file("opt/unicodé-ファイル", b"utf-8\n")
    for d in PurePosixPath(LONG_NAME).parents:
        if str(d) not in (".", "opt"):
            ly.dir(str(d))
    return ly.file(LONG_NAME, b"long\n")


@cache
def feature_image(compression: Compression = "gzip", flavor: Flavor = "oci") -> Image:
    """Three layers exercising whiteouts, opaque dirs, replacements and odd metadata."""
    l2 = Layer(comment="deletions and replacements").dirs("etc", "data", "opt", "var")
    l2.whiteout("etc/to-delete").whiteout("etc/recreated").whiteout("opt/thing")
    l2.opaque("data").file("data/new", b"only child after opaque\n")
    l2.file("etc/motd", b"replaced\n", mode=0o600)
    l2.symlink("etc/alt", "motd")
    l2.file("etc/chmodme", b"mode change only\n", mode=0o755, uid=1000)
    l2.file("var/cache", b"a directory replaced by a file\n")
    l3 = Layer(comment="recreations").dirs("etc", "opt", "srv", "var", "usr", "usr/bin")
    l3.file("etc/recreated", b"version three\n", mode=0o600, uid=1000, gid=1000)
    l3.dir("opt/thing", mode=0o700).file("opt/thing/inside", b"inside\n")
    l3.whiteout("var/log").whiteout("usr/bin/gone-link")
    l3.file("srv/l3file", b"layer 3\n", mode=0o755, uid=7, gid=8, mtime=1234567890)
    l3.hardlink("srv/l3link", "srv/l3file")
    return Image(
        layers=(_feature_base(), l2, l3),
        compression=compression,
        flavor=flavor,
        cmd=None,
        entrypoint=("/bin/sh", "-c"),
        working_dir="/srv",
        user="1000:1000",
        env=(DEFAULT_PATH_ENV, "FEATURE=yes"),
        labels=(("org.example.kind", "feature"),),
    )
