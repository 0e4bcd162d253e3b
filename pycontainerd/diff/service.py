"""The differ: apply a layer onto mounts, and compute a layer between two mount sets.

Apply streams the blob from the content store through decompression into the archive
library (``pycontainerd.archive``) on a worker thread and returns the uncompressed
digest and size: the diff ID the client compares with the image config. Mounts are used
the way containerd's overlay-aware applier does: an overlay mount is applied straight
into its upperdir with whiteouts in overlay form (the lowerdirs stay untouched); a single
bind mount is applied into its source; anything else is mounted on a temporary directory
first.

Diff mounts both sides read-only, writes the changes as a tar (compressed to the asked
media type) and commits it to the content store with the ``containerd.io/uncompressed``
label.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from pycontainerd.archive import (
    ArchiveCanceled,
    UnsupportedMediaType,
    apply_layer,
    compress,
    compression_for_media_type,
    decompress_stream,
    write_diff,
)
from pycontainerd.errdefs import FailedPrecondition, InvalidArgument, PycdError, Unimplemented
from pycontainerd.snapshots.mount import Mount, option_value, temp_mount

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

    from pycontainerd.archive.compression import CompressWriter
    from pycontainerd.content.local import BlobReader
    from pycontainerd.content.metadata import NamespacedContentStore
    from pycontainerd.transfer.staging import Stager

log = logging.getLogger(__name__)

LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
UNCOMPRESSED_LABEL = "containerd.io/uncompressed"
_CHUNK = 1 << 20


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: dict[str, str] = field(default_factory=dict)


class _ReaderFile:
    """A committed blob as a sequential file object for the decompressor."""

    def __init__(self, reader: BlobReader) -> None:
        self._reader = reader
        self._offset = 0

    def read(self, n: int = -1) -> bytes:
        if n < 0:
            n = max(0, self._reader.size - self._offset)
        data = self._reader.read_at(self._offset, n)
        self._offset += len(data)
        return data

    def readinto(self, buf: bytearray | memoryview) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)


def _apply_sync(
    mounts: Sequence[Mount], stream: BinaryIO, cancel: threading.Event
) -> tuple[str, int]:
    if len(mounts) == 1 and mounts[0].type == "overlay":
        opts = mounts[0].options
        upper = option_value(opts, "upperdir")
        lower = option_value(opts, "lowerdir")
        if upper is not None:
            lowers = [Path(p) for p in lower.split(":")] if lower else []
            r = apply_layer(Path(upper), stream, overlay=True, lower_dirs=lowers, cancel=cancel)
            return r.digest, r.size
    if len(mounts) == 1 and mounts[0].type == "bind":
        if "ro" in mounts[0].options:
            raise FailedPrecondition("cannot apply a layer onto a read-only mount")
        r = apply_layer(Path(mounts[0].source), stream, overlay=False, cancel=cancel)
        return r.digest, r.size
    with temp_mount(mounts) as root:
        r = apply_layer(root, stream, overlay=False, cancel=cancel)
        return r.digest, r.size


class Differ:
    """Apply and Diff over the namespaced content store.

    With a ``stager``, Apply first looks for the layer already unpacked on the side while
    its blob was written (:mod:`pycontainerd.transfer.staging`) and moves it into place
    when the mounts fit; otherwise it unpacks the blob as usual.
    """

    def __init__(
        self, content: NamespacedContentStore, tmp_root: Path, stager: Stager | None = None
    ) -> None:
        self._content = content
        self._tmp_root = tmp_root
        self.stager = stager
        tmp_root.mkdir(parents=True, exist_ok=True, mode=0o700)

    async def _staged(self, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor | None:
        stager = self.stager
        if stager is None or not stager.staged(desc.digest):
            return None
        await self._content.info(desc.digest)  # this namespace must have the blob
        result = await stager.adopt(desc.digest, mounts)
        if result is None:
            return None
        log.debug("apply %s: moved in its unpack made while it was written", desc.digest)
        return Descriptor(LAYER_TAR, result.digest, result.size)

    async def apply(self, desc: Descriptor, mounts: Sequence[Mount]) -> Descriptor:
        """Apply layer ``desc`` onto ``mounts``; returns the uncompressed descriptor."""
        if not mounts:
            raise InvalidArgument("no mounts to apply the layer onto")
        try:
            compression_for_media_type(desc.media_type)
        except UnsupportedMediaType as exc:
            # containerd has no error class for this (ErrNoProcessor): UNKNOWN.
            raise PycdError(f"no processor for media-type {desc.media_type!r}") from exc
        staged = await self._staged(desc, mounts)
        if staged is not None:
            return staged
        reader = await self._content.open_reader(desc.digest)
        cancel = threading.Event()

        def _run() -> tuple[str, int]:
            with reader:
                src = _ReaderFile(reader)
                stream = decompress_stream(src, desc.media_type)
                return _apply_sync(mounts, stream, cancel)  # type: ignore[arg-type]

        task = asyncio.ensure_future(asyncio.to_thread(_run))
        try:
            digest, size = await asyncio.shield(task)
        except asyncio.CancelledError:
            # The client went away: stop the extraction between entries, then let the
            # thread finish unwinding before the caller cleans the snapshot up.
            cancel.set()
            with contextlib.suppress(ArchiveCanceled, Exception):
                await task
            raise
        return Descriptor(LAYER_TAR, digest, size)

    async def diff(
        self,
        lower: Sequence[Mount],
        upper: Sequence[Mount],
        media_type: str = "",
        ref: str = "",
        labels: Mapping[str, str] | None = None,
    ) -> Descriptor:
        """Write the changes from ``lower`` to ``upper`` as a layer into the content store."""
        media_type = media_type or LAYER_TAR_GZIP
        try:
            compression_for_media_type(media_type)
        except UnsupportedMediaType as exc:
            raise Unimplemented(f"unsupported diff media type: {media_type}") from exc
        if not upper:
            raise InvalidArgument("no upper mounts to diff")
        fd, tmp = tempfile.mkstemp(prefix="diff-", dir=self._tmp_root)
        os.close(fd)
        try:
            diff_id, compressed_size = await asyncio.to_thread(
                self._diff_sync, lower, upper, media_type, tmp
            )
            digest = await self._store(
                tmp,
                ref or f"diff-{secrets.token_hex(8)}",
                compressed_size,
                dict(labels or {}),
                diff_id,
            )
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return Descriptor(media_type, digest, compressed_size, {})

    def _diff_sync(
        self, lower: Sequence[Mount], upper: Sequence[Mount], media_type: str, out_path: str
    ) -> tuple[str, int]:
        with contextlib.ExitStack() as stack:
            lower_root = stack.enter_context(temp_mount(_readonly(lower))) if lower else None
            upper_root = stack.enter_context(temp_mount(_readonly(upper)))
            with open(out_path, "wb") as raw:
                hasher = _HashingWriter()
                with compress(raw, media_type) as cw:
                    tee = _Tee(cw, hasher)
                    write_diff(lower_root, upper_root, tee, overlay_upper=False)
                raw.flush()
                os.fsync(raw.fileno())
            return "sha256:" + hasher.h.hexdigest(), os.path.getsize(out_path)

    async def _store(
        self, path: str, ref: str, size: int, labels: dict[str, str], diff_id: str
    ) -> str:
        labels[UNCOMPRESSED_LABEL] = diff_id
        w = await self._content.writer(ref, total=size)
        try:
            offset = 0
            with open(path, "rb") as f:  # noqa: ASYNC230 - small reads, each in a thread below
                while True:
                    chunk = await asyncio.to_thread(f.read, _CHUNK)
                    if not chunk:
                        break
                    await w.write_at(offset, chunk)
                    offset += len(chunk)
            return await w.commit(size=size, labels=labels)
        finally:
            await w.close()


def _readonly(mounts: Sequence[Mount]) -> list[Mount]:
    out = []
    for m in mounts:
        opts = tuple(o for o in m.options if o not in ("rw",))
        out.append(Mount(m.type, m.source, m.target, (*opts, "ro") if "ro" not in opts else opts))
    return out


class _HashingWriter:
    def __init__(self) -> None:
        self.h = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.h.update(data)
        return len(data)


class _Tee:
    """Uncompressed tar bytes go to the compressor and to the diff-ID hash."""

    def __init__(self, out: CompressWriter, hasher: _HashingWriter) -> None:
        self._out = out
        self._hasher = hasher

    def write(self, data: bytes) -> int:
        self._hasher.write(data)
        return self._out.write(data)

    def flush(self) -> None:
        return None


__all__ = ["Descriptor", "Differ"]
