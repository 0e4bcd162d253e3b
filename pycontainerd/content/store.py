"""Domain types of the content store: blob info, ingest status, digest validation.

A blob is named by its digest (``sha256:<64 lowercase hex>``); the digest becomes a path
under ``blobs/``, so it is validated before anything touches the filesystem. An ingest
(an upload in progress) is named by a client-chosen *ref*, which never becomes a path
itself: the backend hashes it. Timestamps are integer nanoseconds since the epoch (UTC),
the unit the metadata database stores.

The on-disk backend is ``pycontainerd.content.local``; the namespaced view over it (what
services and other plugins use) is ``pycontainerd.content.metadata``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pycontainerd.errdefs import InvalidArgument, OutOfRange

__all__ = [
    "ALGORITHMS",
    "Info",
    "Status",
    "read_section",
    "split_digest",
    "validate_digest",
]

# The algorithms go-digest knows, with their hex length. Blobs are only ever hashed with
# sha256; the others validate so that a lookup of one answers NotFound, as containerd does.
ALGORITHMS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}
_DIGEST = re.compile(r"\A(sha256|sha384|sha512):([a-f0-9]+)\Z")


def split_digest(digest: str) -> tuple[str, str]:
    """Return ``(algorithm, hex)`` of a valid digest; InvalidArgument otherwise."""
    m = _DIGEST.match(digest)
    if m is None or len(m.group(2)) != ALGORITHMS[m.group(1)]:
        raise InvalidArgument(f"{digest!r} failed validation: invalid digest")
    return m.group(1), m.group(2)


def validate_digest(digest: str) -> str:
    """Return ``digest`` unchanged if it is a valid digest string; InvalidArgument otherwise."""
    split_digest(digest)
    return digest


@dataclass(frozen=True, slots=True)
class Info:
    """A committed blob as one namespace sees it."""

    digest: str
    size: int
    created_at: int = 0
    updated_at: int = 0
    labels: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Status:
    """The progress of one ingest."""

    ref: str
    offset: int
    total: int = 0
    started_at: int = 0
    updated_at: int = 0
    expected: str = ""


def read_section(blob_size: int, offset: int, size: int) -> tuple[int, int]:
    """The ``(start, length)`` a read request selects, with containerd's Read rules.

    A negative offset counts as 0; an offset past the end is OutOfRange; a size of 0 (or
    one reaching past the end) reads to the end.
    """
    offset = max(offset, 0)
    if offset > blob_size:
        raise OutOfRange(f"read past object length {blob_size} bytes")
    if size <= 0 or offset + size > blob_size:
        size = blob_size - offset
    return offset, size
