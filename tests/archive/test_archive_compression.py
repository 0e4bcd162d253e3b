"""Streaming decompression and compression of layer blobs."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import zlib

import pytest
import zstandard

from pycontainerd import errdefs
from pycontainerd.archive import (
    Compression,
    CompressionError,
    UnsupportedMediaType,
    apply_layer,
    compress,
    compression_for_media_type,
    decompress_stream,
)

PAYLOAD = os.urandom(300_000) + bytes(3_000_000)


def read_all(reader, n: int = 1 << 20) -> bytes:
    parts = []
    while chunk := reader.read(n):
        assert len(chunk) <= n
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize(
    ("media_type", "expected"),
    [
        ("application/vnd.oci.image.layer.v1.tar", None),
        ("application/vnd.oci.image.layer.v1.tar+gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.v1.tar+zstd", Compression.ZSTD),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar", None),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip", Compression.GZIP),
        ("application/vnd.oci.image.layer.nondistributable.v1.tar+zstd", Compression.ZSTD),
        ("application/vnd.docker.image.rootfs.diff.tar", None),
        ("application/vnd.docker.image.rootfs.diff.tar.gzip", Compression.GZIP),
        ("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", Compression.GZIP),
    ],
)
def test_media_types(media_type: str, expected: Compression | None) -> None:
    assert compression_for_media_type(media_type) is expected


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.layer.v1.tar+lz4",
        "",
    ],
)
def test_unknown_media_type(media_type: str) -> None:
    with pytest.raises(UnsupportedMediaType) as info:
        decompress_stream(io.BytesIO(b""), media_type)
    assert isinstance(info.value, errdefs.Unimplemented)


def test_gzip_multi_member_bounded_reads() -> None:
    blob = gzip.compress(PAYLOAD[:1000]) + gzip.compress(PAYLOAD[1000:]) + b"\0" * 100
    assert (
        read_all(
            decompress_stream(io.BytesIO(blob), "application/vnd.oci.image.layer.v1.tar+gzip"), 4096
        )
        == PAYLOAD
    )


def test_zstd_multi_frame() -> None:
    cctx = zstandard.ZstdCompressor()
    blob = cctx.compress(PAYLOAD[:1000]) + cctx.compress(PAYLOAD[1000:])
    assert read_all(decompress_stream(io.BytesIO(blob))) == PAYLOAD


def test_detection_ignores_a_mislabelled_type() -> None:
    blob = gzip.compress(PAYLOAD)
    assert (
        read_all(
            decompress_stream(io.BytesIO(blob), "application/vnd.docker.image.rootfs.diff.tar")
        )
        == PAYLOAD
    )
    assert (
        read_all(
            decompress_stream(io.BytesIO(PAYLOAD), "application/vnd.oci.image.layer.v1.tar+gzip")
        )
        == PAYLOAD
    )


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated_input_is_an_error(kind: str) -> None:
    blob = (
        gzip.compress(PAYLOAD) if kind == "gzip" else zstandard.ZstdCompressor().compress(PAYLOAD)
    )
    with pytest.raises(CompressionError, match="unexpected EOF"):
        read_all(decompress_stream(io.BytesIO(blob[: len(blob) // 2])))


def test_garbage_after_gzip_is_an_error() -> None:
    with pytest.raises(CompressionError):
        read_all(decompress_stream(io.BytesIO(gzip.compress(b"x") + b"garbage")))


def test_corrupt_gzip_is_an_error() -> None:
    blob = bytearray(gzip.compress(PAYLOAD))
    blob[100:110] = b"\xff" * 10
    with pytest.raises(CompressionError):
        read_all(decompress_stream(io.BytesIO(bytes(blob))))


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_bomb_is_read_in_bounded_chunks(kind: str) -> None:
    size = 256 << 20
    if kind == "gzip":
        comp = zlib.compressobj(9, zlib.DEFLATED, 31)
        zero = bytes(1 << 20)
        blob = b"".join(comp.compress(zero) for _ in range(size >> 20)) + comp.flush()
    else:
        blob = zstandard.ZstdCompressor(level=19).compress(bytes(size))
    assert len(blob) < size // 500
    reader = decompress_stream(io.BytesIO(blob))
    total = 0
    while chunk := reader.read(1 << 20):
        assert len(chunk) <= 1 << 20
        total += len(chunk)
    assert total == size


@pytest.mark.parametrize(
    "media_type",
    [
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar",
    ],
)
def test_compress_round_trip(media_type: str) -> None:
    out = io.BytesIO()
    with compress(out, media_type) as writer:
        for i in range(0, len(PAYLOAD), 70_000):
            writer.write(PAYLOAD[i : i + 70_000])
    assert read_all(decompress_stream(io.BytesIO(out.getvalue()), media_type)) == PAYLOAD
    if media_type.endswith("tar"):
        assert out.getvalue() == PAYLOAD


def test_apply_truncated_gzip_layer(tmp_path, tar, sentinel) -> None:
    data = tar().file("f", os.urandom(200_000)).bytes()
    blob = gzip.compress(data)
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(CompressionError):
        apply_layer(root, decompress_stream(io.BytesIO(blob[:-20])), overlay=False)
    result = apply_layer(root, decompress_stream(io.BytesIO(blob)), overlay=False)
    assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
