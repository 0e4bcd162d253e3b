"""Images through the SDK against both daemons: import of OCI and Docker archives
(unpacked for this host, with containerd's gc labels), multi-platform indexes, export
and re-import, tag and remove, and hostile archives (bombs, missing blobs, ambiguous
documents)."""

from __future__ import annotations

import json
import tarfile
from typing import TYPE_CHECKING

import pytest

from pycontainerd.api.services.snapshots.v1 import snapshots_pb2
from pycontainerd.client.images import GC_CONTENT_PREFIX, GC_SNAPSHOT_PREFIX
from pycontainerd.client.oci import parse_index, parse_manifest
from pycontainerd.errdefs import InvalidArgument, NotFound
from tests.client.conftest import BUSYBOX_REF
from tests.support.images import (
    Image,
    Layer,
    busybox_image,
    host_platform,
    multi_platform_index,
    sha256_digest,
    write_oci_archive,
)

if TYPE_CHECKING:
    from pathlib import Path

    from pycontainerd.client import Client

pytestmark = pytest.mark.root


async def snapshot_kind(client: Client, key: str, snapshotter: str = "overlayfs") -> int:
    resp = await client.call(
        client.snapshots_stub.Stat,
        snapshots_pb2.StatSnapshotRequest(snapshotter=snapshotter, key=key),
    )
    return int(resp.info.kind)


async def test_import_oci_unpacks_with_gc_labels(
    any_client: Client, archives: dict[str, Path]
) -> None:
    bb = busybox_image()
    [img] = await any_client.import_archive(archives["oci"])
    assert img.name == BUSYBOX_REF
    assert img.target.digest == sha256_digest(bb.manifest_bytes)
    assert await snapshot_kind(any_client, bb.chain_id) == snapshots_pb2.COMMITTED
    manifest = await any_client.content.info(img.target.digest)
    assert manifest.labels[GC_CONTENT_PREFIX + "config"] == bb.config_descriptor["digest"]
    assert manifest.labels[GC_CONTENT_PREFIX + "l.0"] == bb.layer_blobs[0].digest
    config = await any_client.content.info(bb.config_descriptor["digest"])
    assert config.labels[GC_SNAPSHOT_PREFIX + "overlayfs"] == bb.chain_id
    layer = await any_client.content.info(bb.layer_blobs[0].digest)
    assert layer.labels["containerd.io/uncompressed"] == bb.diff_ids[0]
    resolved = await any_client.resolve_image(BUSYBOX_REF)
    assert resolved.chain_id == bb.chain_id
    assert resolved.runtime_config["Cmd"] == ["sh"]
    # No lease is left behind by the import.
    assert await any_client.list_leases() == []


async def test_import_docker_archive(any_client: Client, archives: dict[str, Path]) -> None:
    bb = busybox_image(flavor="docker")
    [img] = await any_client.import_archive(archives["docker"])
    assert img.name == "docker.io/sdk/busybox:docker"
    assert img.target.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    resolved = await any_client.resolve_image(img)
    assert resolved.diff_ids == bb.diff_ids
    assert await snapshot_kind(any_client, bb.chain_id) == snapshots_pb2.COMMITTED


async def test_multi_platform_index_unpacks_host_platform(
    any_client: Client, tmp_path: Path
) -> None:
    index = multi_platform_index()
    path = tmp_path / "multi.tar"
    write_oci_archive(path, {"example.com/sdk/multi:1": index})
    [img] = await any_client.import_archive(path)
    assert img.target.media_type == "application/vnd.oci.image.index.v1+json"
    host = index.image_for(host_platform())
    assert await snapshot_kind(any_client, host.chain_id) == snapshots_pb2.COMMITTED
    others = [i for i in index.images if i.platform != host_platform()]
    for other in others:
        with pytest.raises(NotFound):
            await snapshot_kind(any_client, other.chain_id)


async def test_export_then_import_elsewhere(
    any_client: Client, archives: dict[str, Path], tmp_path: Path
) -> None:
    [img] = await any_client.import_archive(archives["oci"], unpack=False)
    out = tmp_path / "export.tar"
    index = await any_client.export_archive(out, img.name)
    assert index["manifests"][0]["digest"] == img.target.digest
    with tarfile.open(out) as tf:
        names = set(tf.getnames())
    assert {"oci-layout", "index.json"} <= names
    for digest in busybox_image().blobs():
        assert f"blobs/sha256/{digest[7:]}" in names
    other = any_client.with_namespace(any_client.namespace + "-b")
    [back] = await other.import_archive(out)
    assert back.name == img.name
    assert back.target.digest == img.target.digest


async def test_tag_and_remove(any_client: Client, archives: dict[str, Path]) -> None:
    [img] = await any_client.import_archive(archives["oci"], unpack=False)
    tagged = await any_client.tag_image(img.name, "example.com/sdk/other:2")
    assert tagged.target == img.target
    names = {i.name for i in await any_client.list_images()}
    assert names == {img.name, "example.com/sdk/other:2"}
    await any_client.remove_image(img.name)
    with pytest.raises(NotFound):
        await any_client.get_image(img.name)
    assert (await any_client.get_image("example.com/sdk/other:2")).target == img.target


async def test_oversized_index_json_is_refused(any_client: Client, tmp_path: Path) -> None:
    path = tmp_path / "bomb.tar"
    with tarfile.open(path, "w") as tf:
        for name, size in (("oci-layout", 30), ("index.json", 21 << 20)):
            ti = tarfile.TarInfo(name)
            ti.size = size
            with (tmp_path / "zeros").open("wb+") as f:
                f.truncate(size)
                f.seek(0)
                tf.addfile(ti, f)
    with pytest.raises(InvalidArgument, match="limit"):
        await any_client.import_archive(path)


async def test_archive_missing_a_manifest_blob(any_client: Client, tmp_path: Path) -> None:
    img = Image(layers=(Layer().file("hello", b"hi"),))
    path = tmp_path / "partial.tar"
    write_oci_archive(path, {"example.com/sdk/partial:1": img})
    rewritten = tmp_path / "missing.tar"
    with tarfile.open(path) as src, tarfile.open(rewritten, "w") as dst:
        for m in src:
            if m.name.endswith(sha256_digest(img.manifest_bytes)[7:]):
                continue
            dst.addfile(m, src.extractfile(m) if m.isreg() else None)
    with pytest.raises(NotFound, match="lacks blob"):
        await any_client.import_archive(rewritten)
    assert await any_client.list_images() == []


def test_ambiguous_documents_are_rejected() -> None:
    both = json.dumps({"schemaVersion": 2, "manifests": [], "config": {}, "layers": []}).encode()
    with pytest.raises(InvalidArgument, match="expected manifest but found index"):
        parse_manifest(both, "application/vnd.oci.image.manifest.v1+json")
    with pytest.raises(InvalidArgument, match="expected index but found manifest"):
        parse_index(both, "application/vnd.oci.image.index.v1+json")
    schema1 = json.dumps({"schemaVersion": 1, "fsLayers": []}).encode()
    with pytest.raises(InvalidArgument, match="schema 1"):
        parse_manifest(schema1, "application/vnd.docker.distribution.manifest.v1+json")
