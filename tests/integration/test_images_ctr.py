"""Images on disk, end to end: ``ctr images import`` into the real daemon, then
``ctr images ls/check/mount`` and a comparison of the mounted tree with the model of
the image's layers (``expected_tree``) and, where containerd is installed, with the
tree real containerd unpacks from the same archive."""

from __future__ import annotations

import hashlib
import os
import re
from typing import TYPE_CHECKING

import pytest

from tests.support.containerd import CONTAINERD, Containerd
from tests.support.ctr_images import mounted_listing, table
from tests.support.daemon import Daemon
from tests.support.fs_listing import diff_trees
from tests.support.images import (
    Compression,
    Image,
    Layer,
    busybox_image,
    expected_tree,
    feature_image,
    host_platform,
    multi_platform_index,
    write_docker_archive,
    write_oci_archive,
)

if TYPE_CHECKING:
    from pathlib import Path

    from tests.support.fs_listing import Entry

pytestmark = [pytest.mark.ctr, pytest.mark.root]


def image_rows(d: Daemon, ns: str, *args: str) -> dict[str, list[str]]:
    """`ctr images ls` or `ctr images check` as {ref: columns}."""
    return table(d.ctr("images", *args, namespace=ns).stdout)


def import_and_check(
    d: Daemon,
    ns: str,
    archive: Path,
    ref: str,
    image: Image,
    where: Path,
    snapshotter: str | None = None,
) -> dict[str, Entry]:
    """Import, check ls/check/snapshots, mount and compare with the model; returns the listing."""
    sn = ["--snapshotter", snapshotter] if snapshotter else []
    out = d.ctr("images", "import", *sn, str(archive), namespace=ns).stdout
    assert f"unpacking {ref}" in out and "done" in out, out

    ls = image_rows(d, ns, "ls")
    assert ref in ls, ls
    assert str(host_platform()) in ls[ref][-2].split(","), ls[ref]

    check = image_rows(d, ns, "check", *sn)
    assert check[ref][3] == "complete", check[ref]
    assert check[ref][-1] == "true", check[ref]  # UNPACKED

    snaps = d.ctr("snapshots", *sn, "ls", namespace=ns).stdout
    assert image.chain_id in snaps
    assert "extract-" not in snaps

    tree = mounted_listing(d, ns, ref, where, snapshotter)
    diff = diff_trees(expected_tree(image), tree, ignore_dir_mtime=True)
    assert diff == [], "\n".join(diff)
    # The unmount with --rm dropped the view snapshot, the committed chain stays.
    snaps = d.ctr("snapshots", *sn, "ls", namespace=ns).stdout
    assert image.chain_id in snaps and "Active" not in snaps and "View" not in snaps
    assert not os.path.ismount(where)
    return tree


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_import_oci_archive(daemon: Daemon, tmp_path: Path, compression: Compression) -> None:
    image = busybox_image(compression)
    ref = f"docker.io/library/bb-{compression}:1"
    archive = tmp_path / "image.tar"
    write_oci_archive(archive, {ref: image})
    ns = f"img-oci-{compression}"
    import_and_check(daemon, ns, archive, ref, image, tmp_path / "mnt")
    media = image_rows(daemon, ns, "ls")[ref][1]
    assert media == "application/vnd.oci.image.manifest.v1+json"
    # The layer blob is stored exactly as archived, under its compressed digest.
    blob = image.layer_blobs[0]
    content = daemon.ctr("content", "ls", namespace=ns).stdout
    assert blob.digest in content
    assert f"containerd.io/uncompressed={blob.diff_id}" in content


def test_import_docker_save_archive(daemon: Daemon, tmp_path: Path) -> None:
    image = busybox_image("none", "docker")
    ref = "docker.io/library/bb-docker:1"
    archive = tmp_path / "docker.tar"
    write_docker_archive(archive, [ref], image)
    ns = "img-docker"
    import_and_check(daemon, ns, archive, ref, image, tmp_path / "mnt")
    media = image_rows(daemon, ns, "ls")[ref][1]
    assert media == "application/vnd.docker.distribution.manifest.v2+json"


def test_import_multi_platform_index_unpacks_host(daemon: Daemon, tmp_path: Path) -> None:
    index = multi_platform_index()
    host = index.image_for(host_platform())
    ref = "docker.io/library/multi:1"
    archive = tmp_path / "multi.tar"
    write_oci_archive(archive, {ref: index})
    ns = "img-multi"
    tree = import_and_check(daemon, ns, archive, ref, host, tmp_path / "mnt")
    marker = f"{host_platform()}\n".encode()
    assert tree["etc/platform"].sha256 == hashlib.sha256(marker).hexdigest()
    row = image_rows(daemon, ns, "ls")[ref]
    assert row[1] == "application/vnd.oci.image.index.v1+json"
    # Only the host's manifest was unpacked: no other platform's chain exists.
    snaps = daemon.ctr("snapshots", "ls", namespace=ns).stdout
    others = [img for img in index.images if img is not host]
    assert others and all(img.chain_id not in snaps for img in others)


@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_feature_image_matches_model(daemon: Daemon, tmp_path: Path, snapshotter: str) -> None:
    image = feature_image()
    ref = "docker.io/library/feature:1"
    archive = tmp_path / "feature.tar"
    write_oci_archive(archive, {ref: image})
    tree = import_and_check(
        daemon, f"img-feature-{snapshotter}", archive, ref, image, tmp_path / "mnt", snapshotter
    )
    # Spot checks of what the model comparison covers, so a model bug cannot hide one.
    assert "etc/to-delete" not in tree and "data/old1" not in tree
    assert tree["bin/suid"].mode == 0o4755
    assert tree["dev/null-copy"].rdev == (1, 3)
    assert tree["usr/bin/tool-alias"].link_group == "usr/bin/tool"
    assert tree["opt/thing"].type == "dir" and tree["var/cache"].type == "file"


@pytest.mark.skipif(CONTAINERD is None, reason="needs containerd (apt install containerd)")
@pytest.mark.parametrize("snapshotter", ["overlayfs", "native"])
def test_feature_image_same_tree_as_containerd(
    daemon: Daemon, tmp_path: Path, snapshotter: str
) -> None:
    image = feature_image("zstd")
    ref = "docker.io/library/feature-zstd:1"
    archive = tmp_path / "feature.tar"
    write_oci_archive(archive, {ref: image})
    ns = f"img-vs-ctd-{snapshotter}"
    ours = import_and_check(daemon, ns, archive, ref, image, tmp_path / "ours", snapshotter)
    real = Containerd().start()
    try:
        real.ctr("images", "import", "--snapshotter", snapshotter, str(archive), namespace=ns)
        theirs = mounted_listing(real, ns, ref, tmp_path / "theirs", snapshotter)
    finally:
        real.cleanup()
    diff = diff_trees(theirs, ours)
    assert diff == [], "\n".join(diff)


def _moved_in(d: Daemon) -> list[str]:
    """Layers Diff.Apply took from their unpack made while ctr wrote them."""
    return re.findall(r"apply (sha256:[0-9a-f]{64}): moved in its unpack", d.log())


def fresh_image() -> Image:
    """Layers no other test wrote (a blob the daemon holds already is not written again),
    with whiteouts, an opaque dir, implied parents over a setgid dir, and a first layer
    whose opaque marker follows a directory it only implied — which the speculative
    unpack cannot turn into a first layer, so Diff.Apply does that one."""
    tag = os.urandom(8).hex().encode()
    base = Layer(comment="first").file("id", tag).file("a/b/f", b"f").opaque("a")
    base.dir("srv").dir("srv/shared", mode=0o2775, gid=50).file("etc/x", b"x").dir("etc")
    mid = Layer(comment="second").file("srv/shared/deep/f", tag).whiteout("etc/x")
    mid.dir("opt").file("opt/o", b"o")
    top = Layer(comment="third").dirs("opt").opaque("opt").file("opt/p", tag).file("id2", tag)
    return Image(layers=(base, mid, top), compression="gzip", cmd=None)


def _import_fresh(tmp_path: Path, image: Image, config: str) -> tuple[dict[str, Entry], list[str]]:
    """Import ``image`` with ctr into a daemon of its own; (mounted tree, moved-in layers)."""
    tmp_path.mkdir()
    d = Daemon(config=config).start()
    try:
        ref = "docker.io/library/fresh:1"
        archive = tmp_path / "fresh.tar"
        write_oci_archive(archive, {ref: image})
        d.ctr("images", "import", str(archive), namespace="spec")
        tree = mounted_listing(d, "spec", ref, tmp_path / "mnt")
        staging = d.root / "io.containerd.internal.v1.staging"
        assert list(staging.iterdir()) == []  # every staged layer went somewhere
        return tree, _moved_in(d)
    finally:
        d.cleanup()


def test_import_unpacks_layers_while_ctr_writes_them(tmp_path: Path) -> None:
    image = fresh_image()
    tree, moved = _import_fresh(tmp_path / "spec", image, "version = 2\n")
    off = '[plugins."io.containerd.internal.v1.staging"]\nspeculative_unpack = false\n'
    plain, none = _import_fresh(tmp_path / "plain", image, "version = 2\n" + off)
    first, *rest = (blob.digest for blob in image.layer_blobs)
    # Layers 2 and 3 were unpacked while ctr wrote them; the first layer's opaque marker
    # came after a/b, which only a naive apply deletes, so Diff.Apply unpacked it.
    assert moved == rest and none == []
    assert diff_trees(plain, tree, ignore_dir_mtime=True) == []
    assert "a/b" not in tree and tree["a"].type == "dir"
    assert (tree["srv/shared/deep"].gid, tree["srv/shared"].mode) == (50, 0o2775)
    assert "etc/x" not in tree and sorted(p for p in tree if p.startswith("opt/")) == ["opt/p"]
    assert first not in moved


def _unpackers(d: Daemon) -> list[int]:
    """Pids of the daemon's speculative unpacker processes."""
    assert d.proc is not None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == d.proc.pid and b"pycontainerd.transfer.unpacker" in cmdline:
            found.append(int(entry))
    return found


def test_import_survives_the_unpacker_dying(daemon: Daemon, tmp_path: Path) -> None:
    """kill -9 of the speculative unpacker between imports: the next import still works
    (unpacked the ordinary way if need be) and a new unpacker takes over."""
    first = fresh_image()
    archive = tmp_path / "one.tar"
    write_oci_archive(archive, {"docker.io/library/one:1": first})
    daemon.ctr("images", "import", str(archive), namespace="unpacker-dies")
    [pid] = _unpackers(daemon)
    os.kill(pid, 9)
    second = fresh_image()
    archive = tmp_path / "two.tar"
    ref = "docker.io/library/two:1"
    write_oci_archive(archive, {ref: second})
    daemon.ctr("images", "import", str(archive), namespace="unpacker-dies")
    tree = mounted_listing(daemon, "unpacker-dies", ref, tmp_path / "mnt")
    assert tree["id"].sha256 == hashlib.sha256(second.layers[0].entries[0].data).hexdigest()
    assert "a/b" not in tree and sorted(p for p in tree if p.startswith("opt/")) == ["opt/p"]
    assert len(_unpackers(daemon)) == 1 and pid not in _unpackers(daemon)
