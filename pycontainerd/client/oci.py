"""OCI / Docker image documents: media types, descriptors, platforms, and validated parsing.

``parse_manifest`` / ``parse_index`` reject ambiguous documents (GHSA-5j5w-g665-5m35: a
JSON with both ``manifests`` and ``config``/``layers``, or a ``mediaType`` field that
contradicts the descriptor) and Docker schema 1. Platform matching follows containerd's
default matcher for the host: same OS and architecture, and a variant that is equal or,
for arm, not newer than the host's.
"""

from __future__ import annotations

import hashlib
import json
import platform as _platform
from dataclasses import dataclass, field
from typing import Any

from pycontainerd.api.types import descriptor_pb2
from pycontainerd.errdefs import InvalidArgument, NotFound

__all__ = [
    "INDEX_TYPES",
    "LAYER_TYPES",
    "MANIFEST_TYPES",
    "Descriptor",
    "Platform",
    "chain_ids",
    "host_platform",
    "is_index",
    "is_manifest",
    "parse_index",
    "parse_manifest",
    "select_platform",
    "sha256_digest",
]

MT_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MT_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MT_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MT_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MT_DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
MT_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
INDEX_TYPES = frozenset({MT_OCI_INDEX, MT_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MT_OCI_MANIFEST, MT_DOCKER_MANIFEST})
LAYER_TYPES = frozenset(
    {
        MT_OCI_LAYER,
        MT_OCI_LAYER + "+gzip",
        MT_OCI_LAYER + "+zstd",
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        MT_DOCKER_LAYER,
        MT_DOCKER_LAYER + ".gzip",
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
    }
)
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_index(media_type: str) -> bool:
    return media_type in INDEX_TYPES


def is_manifest(media_type: str) -> bool:
    return media_type in MANIFEST_TYPES


@dataclass(frozen=True, slots=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    @classmethod
    def parse(cls, text: str) -> Platform:
        """``os/arch[/variant]`` as in ``linux/arm64/v8``."""
        parts = text.split("/")
        if len(parts) not in (2, 3) or not all(parts):
            raise InvalidArgument(f"invalid platform {text!r}")
        return cls(parts[0], parts[1], parts[2] if len(parts) == 3 else "")

    @classmethod
    def from_json(cls, doc: Any) -> Platform | None:
        if not isinstance(doc, dict):
            return None
        return cls(
            str(doc.get("os", "")), str(doc.get("architecture", "")), str(doc.get("variant", ""))
        )

    def matches(self, other: Platform) -> bool:
        """True when an image for ``other`` runs on this (host) platform."""
        if self.os != other.os or self.architecture != other.architecture:
            return False
        if not other.variant or other.variant == self.variant:
            return True
        # arm v7 hosts run v6/v5 images; the reverse does not hold.
        if self.architecture == "arm" and self.variant and other.variant:
            return other.variant < self.variant
        return self.architecture == "arm64" and other.variant == "v8"

    def __str__(self) -> str:
        return "/".join(filter(None, (self.os, self.architecture, self.variant)))


_MACHINE = {
    "x86_64": ("amd64", ""),
    "aarch64": ("arm64", ""),
    "armv7l": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "i686": ("386", ""),
}


def host_platform() -> Platform:
    arch, variant = _MACHINE.get(_platform.machine(), (_platform.machine(), ""))
    return Platform("linux", arch, variant)


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)
    platform: Platform | None = None
    urls: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, doc: Any) -> Descriptor:
        if not isinstance(doc, dict):
            raise InvalidArgument("descriptor is not an object")
        try:
            digest = str(doc["digest"])
            size = int(doc["size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgument(f"invalid descriptor: {exc}") from exc
        if size < 0 or not digest.startswith("sha256:") or len(digest) != 71:
            raise InvalidArgument(f"invalid descriptor {digest!r} size {size}")
        ann = doc.get("annotations") or {}
        urls = doc.get("urls") or ()
        return cls(
            str(doc.get("mediaType", "")),
            digest,
            size,
            {str(k): str(v) for k, v in ann.items()} if isinstance(ann, dict) else {},
            Platform.from_json(doc.get("platform")),
            tuple(str(u) for u in urls) if isinstance(urls, list) else (),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest}
        out["size"] = self.size
        if self.annotations:
            out["annotations"] = dict(self.annotations)
        if self.platform is not None:
            p = {"architecture": self.platform.architecture, "os": self.platform.os}
            if self.platform.variant:
                p["variant"] = self.platform.variant
            out["platform"] = p
        return out

    def to_pb(self) -> descriptor_pb2.Descriptor:
        return descriptor_pb2.Descriptor(
            media_type=self.media_type,
            digest=self.digest,
            size=self.size,
            annotations=self.annotations,
        )

    @classmethod
    def from_pb(cls, pb: descriptor_pb2.Descriptor) -> Descriptor:
        return cls(pb.media_type, pb.digest, pb.size, dict(pb.annotations))


def _load(data: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise InvalidArgument(f"invalid JSON document: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidArgument("image document is not a JSON object")
    if "fsLayers" in doc or doc.get("schemaVersion") == 1:
        raise InvalidArgument("Docker schema 1 manifests are not supported")
    return doc


@dataclass(frozen=True, slots=True)
class Manifest:
    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]


@dataclass(frozen=True, slots=True)
class Index:
    media_type: str
    manifests: tuple[Descriptor, ...]


def parse_manifest(data: bytes, media_type: str) -> Manifest:
    """An image manifest; InvalidArgument when it is really an index or malformed."""
    doc = _load(data)
    declared = doc.get("mediaType")
    if "manifests" in doc or (declared and declared in INDEX_TYPES):
        raise InvalidArgument("media-type: expected manifest but found index")
    if declared and media_type and declared != media_type and declared in MANIFEST_TYPES:
        raise InvalidArgument(f"media-type: descriptor says {media_type}, document {declared}")
    if "config" not in doc or not isinstance(doc.get("layers", []), list):
        raise InvalidArgument("manifest has no config")
    return Manifest(
        str(declared or media_type),
        Descriptor.from_json(doc["config"]),
        tuple(Descriptor.from_json(x) for x in doc.get("layers") or []),
    )


def parse_index(data: bytes, media_type: str) -> Index:
    """An index / manifest list; InvalidArgument when it is really a manifest."""
    doc = _load(data)
    declared = doc.get("mediaType")
    if "config" in doc or "layers" in doc or (declared and declared in MANIFEST_TYPES):
        raise InvalidArgument("media-type: expected index but found manifest")
    if not isinstance(doc.get("manifests"), list):
        raise InvalidArgument("index has no manifests")
    return Index(
        str(declared or media_type), tuple(Descriptor.from_json(x) for x in doc["manifests"])
    )


def select_platform(index: Index, want: Platform | None = None) -> Descriptor:
    """The first entry of ``index`` that runs on ``want`` (default: this host)."""
    want = want or host_platform()
    for d in index.manifests:
        if d.platform is None:
            continue
        if want.matches(d.platform):
            return d
    raise NotFound(f"no manifest for platform {want} in index")


def chain_ids(diff_ids: list[str]) -> list[str]:
    """The snapshot key of each layer stack: chain(n) = sha256(chain(n-1) + " " + diff(n))."""
    out: list[str] = []
    for d in diff_ids:
        out.append(d if not out else sha256_digest(f"{out[-1]} {d}".encode()))
    return out
