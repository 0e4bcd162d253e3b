"""Errors raised by the layer archive library.

Every failure of :mod:`pycontainerd.archive` is an :class:`ArchiveError`, itself a
:class:`~pycontainerd.errdefs.PycdError`, so the diff service can let it propagate and the
gRPC interceptor maps it. Like containerd, a broken or hostile archive is not a client
argument error: it surfaces as UNKNOWN, except for an unknown layer media type (containerd's
``ErrNotImplemented``, our ``Unimplemented``) and cancellation.

Hierarchy::

    ArchiveError (UNKNOWN)
    ├── InvalidArchive             malformed tar, bad whiteout, escaping names, bad values
    │   └── CompressionError       corrupt or truncated gzip/zstd data
    ├── UnsupportedMediaType       also errdefs.Unimplemented (UNIMPLEMENTED)
    └── ArchiveCanceled            also errdefs.Canceled (CANCELLED)
"""

from __future__ import annotations

from pycontainerd import errdefs

__all__ = [
    "ArchiveCanceled",
    "ArchiveError",
    "CompressionError",
    "InvalidArchive",
    "UnsupportedMediaType",
]


class ArchiveError(errdefs.PycdError):
    """A layer could not be applied, computed or (de)compressed."""

    text = "archive error"

    def __str__(self) -> str:
        return self.message or self.text


class InvalidArchive(ArchiveError):
    """The archive is malformed or tries something the unpacker refuses."""

    text = "invalid archive"
    __str__ = errdefs.PycdError.__str__


class CompressionError(InvalidArchive):
    """The compressed stream is corrupt, truncated or followed by garbage."""


class UnsupportedMediaType(ArchiveError, errdefs.Unimplemented):
    """The descriptor's media type is not a layer type we can decompress."""

    text = "not implemented"
    __str__ = errdefs.PycdError.__str__


class ArchiveCanceled(ArchiveError, errdefs.Canceled):
    """The caller set the cancel event while the archive was being processed."""

    text = "context canceled"
    __str__ = errdefs.PycdError.__str__
