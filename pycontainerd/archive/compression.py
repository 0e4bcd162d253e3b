"""Streaming layer (de)compression: gzip, zstd and plain tar, chosen by magic bytes.

containerd's ``archive/compression`` detects the algorithm from the first bytes of the blob
and only uses the media type to reject things that are not layers; we do the same. Readers
pull 1 MiB input chunks and never return more than was asked for, so memory stays bounded
whatever the inflated size (a gzip bomb costs disk, not RAM). A stream that ends inside a
gzip member or a zstd frame raises :class:`CompressionError`, never a silent short read.

Readers have ``read(n)``; writers returned by :func:`compress` have ``write`` and ``close``
(close flushes the trailer but leaves the destination open).
"""

from __future__ import annotations

import enum
import zlib
from typing import TYPE_CHECKING, Protocol

import zstandard

from pycontainerd.archive.errors import CompressionError, UnsupportedMediaType

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "CHUNK_SIZE",
    "MEDIA_TYPE_DOCKER_LAYER",
    "MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP",
    "MEDIA_TYPE_DOCKER_LAYER_GZIP",
    "MEDIA_TYPE_OCI_LAYER",
    "MEDIA_TYPE_OCI_LAYER_GZIP",
    "MEDIA_TYPE_OCI_LAYER_ZSTD",
    "CompressWriter",
    "Compression",
    "Reader",
    "compress",
    "compression_for_media_type",
    "decompress_stream",
    "detect_compression",
]

CHUNK_SIZE = 1 << 20

MEDIA_TYPE_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_TYPE_OCI_LAYER_GZIP = MEDIA_TYPE_OCI_LAYER + "+gzip"
MEDIA_TYPE_OCI_LAYER_ZSTD = MEDIA_TYPE_OCI_LAYER + "+zstd"
_OCI_NONDIST = "application/vnd.oci.image.layer.nondistributable.v1.tar"
MEDIA_TYPE_DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
_DOCKER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar"
MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP = _DOCKER_FOREIGN + ".gzip"

_GZIP_MAGIC = b"\x1f\x8b\x08"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
# A zstd block header of 3 bytes plus one RLE byte can expand to 128 KiB; feeding the
# decompressor at most this many input bytes per call caps its output at ~64 MiB.
_ZSTD_FEED = 2048


class Compression(enum.Enum):
    NONE = "none"
    GZIP = "gzip"
    ZSTD = "zstd"


class Reader(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


class _Source(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...


class _Sink(Protocol):
    def write(self, data: bytes, /) -> int: ...


_MEDIA_TYPES: dict[str, Compression | None] = {
    # None: the media type does not promise a compression; detect it (containerd treats
    # the Docker uncompressed types as "unknown" for exactly that reason).
    MEDIA_TYPE_OCI_LAYER: None,
    MEDIA_TYPE_OCI_LAYER_GZIP: Compression.GZIP,
    MEDIA_TYPE_OCI_LAYER_ZSTD: Compression.ZSTD,
    _OCI_NONDIST: None,
    _OCI_NONDIST + "+gzip": Compression.GZIP,
    _OCI_NONDIST + "+zstd": Compression.ZSTD,
    MEDIA_TYPE_DOCKER_LAYER: None,
    MEDIA_TYPE_DOCKER_LAYER_GZIP: Compression.GZIP,
    _DOCKER_FOREIGN: None,
    MEDIA_TYPE_DOCKER_LAYER_FOREIGN_GZIP: Compression.GZIP,
}


def compression_for_media_type(media_type: str) -> Compression | None:
    """The compression a layer media type declares (None: not declared, detect it).

    Raises :class:`UnsupportedMediaType` for anything that is not a known layer type.
    """
    try:
        return _MEDIA_TYPES[media_type]
    except KeyError:
        raise UnsupportedMediaType(f"unrecognised mediatype {media_type}") from None


def detect_compression(head: bytes) -> Compression:
    """Pick the algorithm from the first bytes of a blob (at least 4 for zstd)."""
    if head.startswith(_GZIP_MAGIC):
        return Compression.GZIP
    if head.startswith(_ZSTD_MAGIC):
        return Compression.ZSTD
    return Compression.NONE


class _PlainReader:
    """Uncompressed passthrough that first replays the bytes used for detection."""

    def __init__(self, src: _Source, head: bytes) -> None:
        self._src = src
        self._head = head

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            n = CHUNK_SIZE
        if self._head:
            out, self._head = self._head[:n], self._head[n:]
            return out
        return self._src.read(n)


class _GzipReader:
    """Multi-member gzip (``wbits=31``), bounded by ``max_length`` on every call."""

    def __init__(self, src: _Source, head: bytes) -> None:
        self._src = src
        self._pending = head
        self._dec = zlib.decompressobj(31)
        self._done = False

    def _fill(self) -> bool:
        if not self._pending:
            self._pending = self._src.read(CHUNK_SIZE)
        return bool(self._pending)

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            n = CHUNK_SIZE
        while not self._done and n > 0:
            if self._dec.eof:
                self._pending = self._dec.unused_data + self._pending
                if not self._next_member():
                    self._done = True
                    break
            if self._dec.unconsumed_tail:
                data = self._dec.unconsumed_tail
            elif self._fill():
                data, self._pending = self._pending, b""
            else:
                # Input is exhausted: zlib may still hold output it could not return
                # under the previous max_length; anything else is a truncated member.
                data = b""
            try:
                out = self._dec.decompress(data, n)
            except zlib.error as exc:
                raise CompressionError(f"gzip: {exc}") from exc
            if out:
                return out
            if not data and not self._dec.eof:
                raise CompressionError("gzip: unexpected EOF")
        return b""

    def _next_member(self) -> bool:
        """After a member's trailer: start the next one, or report a clean end."""
        while True:
            # NUL padding after the last member is tolerated (as gzip(1) does).
            stripped = self._pending.lstrip(b"\0")
            if stripped:
                break
            self._pending = self._src.read(CHUNK_SIZE)
            if not self._pending:
                return False
        self._pending = stripped
        while len(self._pending) < len(_GZIP_MAGIC):
            more = self._src.read(CHUNK_SIZE)
            if not more:
                break
            self._pending += more
        if not self._pending.startswith(_GZIP_MAGIC):
            raise CompressionError("gzip: invalid header after end of stream")
        self._dec = zlib.decompressobj(31)
        return True


class _ZstdReader:
    """Multi-frame zstd, fed in small slices so one call cannot inflate unboundedly.

    ``zstandard``'s stream_reader silently stops at a truncated frame, so we drive a
    per-frame decompressobj ourselves and check ``eof`` when the input runs out.
    """

    def __init__(self, src: _Source, head: bytes) -> None:
        self._src = src
        self._pending = memoryview(head)
        self._dctx = zstandard.ZstdDecompressor()
        self._dec = self._dctx.decompressobj(write_size=1 << 16)
        self._in_frame = False
        self._out: list[bytes] = []
        self._out_len = 0

    def _produce(self, want: int) -> None:
        while self._out_len < want:
            if not self._pending:
                more = self._src.read(CHUNK_SIZE)
                if not more:
                    if self._in_frame:
                        raise CompressionError("zstd: unexpected EOF")
                    return
                self._pending = memoryview(more)
            piece, self._pending = self._pending[:_ZSTD_FEED], self._pending[_ZSTD_FEED:]
            self._in_frame = True
            try:
                out = self._dec.decompress(piece)
            except zstandard.ZstdError as exc:
                raise CompressionError(f"zstd: {exc}") from exc
            if out:
                self._out.append(out)
                self._out_len += len(out)
            if self._dec.eof:
                rest = bytes(self._dec.unused_data) + bytes(self._pending)
                self._pending = memoryview(rest)
                self._dec = self._dctx.decompressobj(write_size=1 << 16)
                self._in_frame = False

    def read(self, n: int = -1, /) -> bytes:
        if n < 0:
            n = CHUNK_SIZE
        self._produce(n)
        data = b"".join(self._out)
        out, rest = data[:n], data[n:]
        self._out = [rest] if rest else []
        self._out_len = len(rest)
        return out


def decompress_stream(src: _Source, media_type: str | None = None) -> Reader:
    """Wrap ``src`` (a compressed blob) in a reader of the uncompressed tar bytes.

    ``media_type`` is validated when given (unknown types raise
    :class:`UnsupportedMediaType`); the algorithm itself is detected from the magic bytes,
    so a mislabelled blob still unpacks, as with containerd.
    """
    if media_type is not None:
        compression_for_media_type(media_type)
    head = b""
    while len(head) < len(_ZSTD_MAGIC):
        more = src.read(len(_ZSTD_MAGIC) - len(head))
        if not more:
            break
        head += more
    kind = detect_compression(head)
    if kind is Compression.GZIP:
        return _GzipReader(src, head)
    if kind is Compression.ZSTD:
        return _ZstdReader(src, head)
    return _PlainReader(src, head)


class CompressWriter:
    """Compressing writer over ``dst``; ``close()`` writes the trailer, not closing dst."""

    def __init__(self, dst: _Sink, kind: Compression, level: int | None = None) -> None:
        self._dst = dst
        self._kind = kind
        self._closed = False
        self._gz: zlib._Compress | None = None
        self._zs: zstandard.ZstdCompressionObj | None = None
        if kind is Compression.GZIP:
            self._gz = zlib.compressobj(6 if level is None else level, zlib.DEFLATED, 31)
        elif kind is Compression.ZSTD:
            self._zs = zstandard.ZstdCompressor(level=3 if level is None else level).compressobj()

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        if self._closed:
            raise ValueError("write to closed CompressWriter")
        if self._gz is not None:
            out = self._gz.compress(data)
        elif self._zs is not None:
            out = self._zs.compress(bytes(data))
        else:
            out = bytes(data)
        if out:
            self._dst.write(out)
        return len(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._gz is not None:
            self._dst.write(self._gz.flush())
        elif self._zs is not None:
            self._dst.write(self._zs.flush())

    def __enter__(self) -> CompressWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def compress(dst: _Sink, media_type: str, *, level: int | None = None) -> CompressWriter:
    """A writer that compresses into ``dst`` as ``media_type`` declares.

    ``+gzip``/``.gzip`` types give gzip, ``+zstd`` zstd, plain ``tar`` types pass through.
    """
    kind = compression_for_media_type(media_type)
    return CompressWriter(dst, Compression.NONE if kind is None else kind, level)
