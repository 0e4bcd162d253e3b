"""OCI layer archives: apply (unpack) a layer safely, compute a layer from two trees.

A pure, blocking library (callers run it in a thread), modelled on containerd's
``archive`` package and continuity's ``fs``:

- :func:`apply_layer` unpacks an uncompressed layer tar into a snapshot directory with
  containerd's containment rules and returns the diff ID;
- :func:`write_diff` writes the changes of a snapshot as a layer tar;
- :func:`decompress_stream` / :func:`compress` handle gzip and zstd by magic bytes and
  layer media type;
- :func:`root_path` resolves an image-controlled path inside a root, as if chrooted.
"""

from __future__ import annotations

from pycontainerd.archive.compression import (
    Compression,
    compress,
    compression_for_media_type,
    decompress_stream,
)
from pycontainerd.archive.diff import write_diff
from pycontainerd.archive.errors import (
    ArchiveCanceled,
    ArchiveError,
    CompressionError,
    InvalidArchive,
    UnsupportedMediaType,
)
from pycontainerd.archive.rootpath import root_path
from pycontainerd.archive.tar import (
    ApplyResult,
    apply_layer,
    copy_implied_parents,
    drop_overlay_markers,
)

__all__ = [
    "ApplyResult",
    "ArchiveCanceled",
    "ArchiveError",
    "Compression",
    "CompressionError",
    "InvalidArchive",
    "UnsupportedMediaType",
    "apply_layer",
    "compress",
    "compression_for_media_type",
    "copy_implied_parents",
    "decompress_stream",
    "drop_overlay_markers",
    "root_path",
    "write_diff",
]
