"""The content, snapshot and image commands of containerd's ``ctr`` against the real
daemon, and what ``images rm --sync`` and namespace deletion do to the disk."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from typing import TYPE_CHECKING

import pytest

from tests.support.content_client import WriteStream, create_lease, delete_lease
from tests.support.ctr_images import table
from tests.support.daemon import Daemon
from tests.support.images import busybox_image, write_oci_archive

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

pytestmark = [pytest.mark.ctr, pytest.mark.root]

NO_AUTO_GC_CONFIG = 'version = 2\n[plugins."io.containerd.gc.v1.scheduler"]\nstartup_delay = -1.0\n'
CONTENT_DIR = "io.containerd.content.v1.content"
OVERLAY_DIR = "io.containerd.snapshotter.v1.overlayfs"


def import_busybox(d: Daemon, ns: str, tmp_path: Path, ref: str = "docker.io/library/bb:1") -> str:
    archive = tmp_path / "bb.tar"
    write_oci_archive(archive, {ref: busybox_image()})
    d.ctr("images", "import", str(archive), namespace=ns)
    return ref


@pytest.fixture
def daemon_without_auto_gc() -> Iterator[Daemon]:
    """A daemon of the test's own with no collection at start-up: it collects only
    after an image or lease deletion, which the tests using it do not make.

    `ctr content ingest` takes no lease and sets no label, and `ctr snapshots view` sets
    no gc.root label, so what they make is garbage for the next collection: the one a
    fresh daemon runs at start-up, or one another test's deletion schedules on the
    shared daemon.
    """
    d = Daemon(config=NO_AUTO_GC_CONFIG).start()
    yield d
    d.cleanup()


def test_content_ingest_ls_get_label_rm(daemon_without_auto_gc: Daemon) -> None:
    d, ns = daemon_without_auto_gc, "content-cmds"
    # Under 1 kB, so ctr prints the size in plain bytes.
    data = "".join(f"line {i} of an ingested blob\n" for i in range(30)).encode()
    assert len(data) < 1000
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    d.ctr("content", "ingest", "my-ingest-ref", input=data, namespace=ns)

    rows = table(d.ctr("content", "ls", namespace=ns).stdout)
    assert rows[digest][1] == f"{len(data)}B" and rows[digest][-1] == "-"
    assert d.ctr("content", "get", digest, namespace=ns).stdout.encode() == data
    # The ingest is gone once committed.
    assert "my-ingest-ref" not in d.ctr("content", "active", namespace=ns).stdout

    d.ctr("content", "label", digest, "foo=bar", "owner=test", namespace=ns)
    labels = table(d.ctr("content", "ls", namespace=ns).stdout)[digest][-1]
    assert sorted(labels.split(",")) == ["foo=bar", "owner=test"]  # Go maps have no order
    d.ctr("content", "label", digest, "foo=", namespace=ns)  # an empty value removes it
    assert table(d.ctr("content", "ls", namespace=ns).stdout)[digest][-1] == "owner=test"

    # Namespaces are isolated: the same digest is unknown elsewhere.
    res = d.ctr("content", "get", digest, namespace="content-other", check=False)
    assert res.returncode != 0 and "not found" in res.stderr

    assert d.ctr("content", "rm", digest, namespace=ns).stdout.strip() == digest
    assert digest not in d.ctr("content", "ls", namespace=ns).stdout
    res = d.ctr("content", "get", digest, namespace=ns, check=False)
    assert res.returncode != 0 and "not found" in res.stderr
    blob = d.root / CONTENT_DIR / "blobs" / "sha256" / digest.split(":")[1]
    assert not blob.exists()


def test_content_active_shows_ingest_in_progress(daemon: Daemon) -> None:
    ns, ref = "content-active", "half-written-ref"
    with daemon.channel() as ch:
        create_lease(ch, ns, "active-lease")
        w = WriteStream(ch, ns, "active-lease")
        w.stat(ref, 10_000)
        assert w.write(0, b"x" * 321).offset == 321
        w.close()
        rows = table(daemon.ctr("content", "active", namespace=ns).stdout)
        assert rows[ref][1] == "321B", rows
        assert ref not in daemon.ctr("content", "active", namespace="content-elsewhere").stdout
        delete_lease(ch, ns, "active-lease", sync=True)
    # The ingest was the lease's: once the lease is gone it is garbage, as in containerd
    # (metadata/gc.go: only an ingest with an expiry is a root; a leased one has none).
    assert ref not in daemon.ctr("content", "active", namespace=ns).stdout


def run_mount(cmd: str, target: Path) -> None:
    """Run the `mount ...` line `ctr snapshots mounts` prints."""
    argv = cmd.split()
    assert argv[0] == "mount" and argv[4] == str(target), cmd
    subprocess.run(argv, check=True, capture_output=True)


def test_snapshot_commands(daemon_without_auto_gc: Daemon, tmp_path: Path) -> None:
    # `ctr snapshots view` sets no gc.root label: the view is garbage for any collection.
    daemon, ns = daemon_without_auto_gc, "snap-cmds"

    def ctr(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return daemon.ctr("snapshots", *args, namespace=ns, check=check)

    def info(key: str) -> dict[str, object]:
        return json.loads(ctr("info", key).stdout)  # type: ignore[no-any-return]

    # A parentless active snapshot is a bind mount of an empty directory.
    ctr("prepare", "base-active")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = ctr("mounts", str(mnt), "base-active").stdout.strip()
    assert cmd.startswith("mount -t bind "), cmd
    run_mount(cmd, mnt)
    try:
        (mnt / "base-file").write_text("in the base\n")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    ctr("commit", "base", "base-active")
    assert info("base")["Kind"] == "Committed"

    # A child is an overlay over the base; what is written in it is committed with it.
    ctr("prepare", "child-active", "base")
    active = info("child-active")
    assert active["Kind"] == "Active" and active["Parent"] == "base"
    assert "containerd.io/gc.root" in active["Labels"]  # type: ignore[operator]
    cmd = ctr("mounts", str(mnt), "child-active").stdout.strip()
    assert cmd.startswith("mount -t overlay overlay ") and "lowerdir=" in cmd, cmd
    run_mount(cmd, mnt)
    try:
        assert (mnt / "base-file").read_text() == "in the base\n"
        (mnt / "child-file").write_bytes(b"c" * 100_000)
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    usage = table(ctr("usage", "child-active").stdout)
    assert usage["child-active"][-1] == "2", usage  # the upper dir and child-file
    ctr("commit", "child", "child-active")
    res = ctr("info", "child-active", check=False)
    assert res.returncode != 0 and "not found" in res.stderr

    # A view of the child shows both layers, read-only.
    ctr("view", "child-view", "child")
    assert info("child-view")["Kind"] == "View"
    cmd = ctr("mounts", str(mnt), "child-view").stdout.strip()
    run_mount(cmd, mnt)
    try:
        assert sorted(os.listdir(mnt)) == ["base-file", "child-file"]
        with pytest.raises(OSError, match="Read-only"):
            (mnt / "new").write_text("no")
    finally:
        subprocess.run(["umount", str(mnt)], check=True)

    rows = table(ctr("ls").stdout)
    assert {k: v[1:] for k, v in rows.items()} == {
        "base": ["Committed"],
        "child": ["base", "Committed"],
        "child-view": ["child", "View"],
    }
    tree = ctr("tree").stdout
    assert tree.index(" base") < tree.index("\\_ child") < tree.index("\\_ child-view"), tree
    all_usage = table(ctr("usage").stdout)
    assert set(all_usage) == {"base", "child", "child-view"}

    ctr("label", "child", "color=blue")
    labels = info("child")["Labels"]
    assert isinstance(labels, dict) and labels["color"] == "blue"
    ctr("label", "child", "color=")
    labels = info("child")["Labels"]
    assert isinstance(labels, dict) and "color" not in labels

    # A snapshot with children cannot go; removing from the leaves up works.
    res = ctr("rm", "child", check=False)
    assert res.returncode != 0 and "failed precondition" in res.stderr, res.stderr
    assert "child" in table(ctr("ls").stdout)
    res = ctr("rm", "nope", check=False)
    assert res.returncode != 0 and "not found" in res.stderr
    ctr("rm", "child-view", "child", "base")
    assert table(ctr("ls").stdout) == {}


def test_images_ls_check_tag_rm(daemon: Daemon, tmp_path: Path) -> None:
    ns = "image-cmds"
    ref = import_busybox(daemon, ns, tmp_path)
    image = busybox_image()
    daemon.ctr("images", "tag", ref, "example.com/bb:copy", namespace=ns)
    res = daemon.ctr("images", "tag", ref, "example.com/bb:copy", namespace=ns, check=False)
    assert res.returncode != 0 and "already exists" in res.stderr
    assert daemon.ctr("images", "ls", "-q", namespace=ns).stdout.split() == [
        ref,
        "example.com/bb:copy",
    ]
    rows = table(daemon.ctr("images", "ls", namespace=ns).stdout)
    assert rows[ref][2] == rows["example.com/bb:copy"][2] == image.descriptor()["digest"]
    check = table(daemon.ctr("images", "check", namespace=ns).stdout)
    assert [c[3] for c in check.values()] == ["complete", "complete"]
    assert [c[-1] for c in check.values()] == ["true", "true"]

    # Removing one name keeps the image's content for the other.
    daemon.ctr("images", "rm", "--sync", ref, namespace=ns)
    assert daemon.ctr("images", "ls", "-q", namespace=ns).stdout.split() == ["example.com/bb:copy"]
    assert image.layer_blobs[0].digest in daemon.ctr("content", "ls", namespace=ns).stdout
    assert image.chain_id in daemon.ctr("snapshots", "ls", namespace=ns).stdout
    res = daemon.ctr("images", "rm", ref, namespace=ns, check=False)
    assert "not found" in res.stderr
    daemon.ctr("images", "rm", "--sync", "example.com/bb:copy", namespace=ns)
    assert daemon.ctr("images", "ls", "-q", namespace=ns).stdout == ""


def test_images_rm_sync_gives_disk_space_back(fresh_daemon: Daemon, tmp_path: Path) -> None:
    d, ns = fresh_daemon, "reclaim"
    ref = import_busybox(d, ns, tmp_path)
    blobs = d.root / CONTENT_DIR / "blobs" / "sha256"
    snapshots = d.root / OVERLAY_DIR / "snapshots"
    assert len(os.listdir(blobs)) >= 3 and len(os.listdir(snapshots)) == 1
    d.ctr("images", "rm", "--sync", ref, namespace=ns)
    assert d.ctr("content", "ls", "-q", namespace=ns).stdout == ""
    assert table(d.ctr("snapshots", "ls", namespace=ns).stdout) == {}
    assert os.listdir(blobs) == []
    assert os.listdir(snapshots) == []


def test_namespace_with_content_cannot_be_deleted(daemon: Daemon, tmp_path: Path) -> None:
    ns = "ns-not-empty"
    ref = import_busybox(daemon, ns, tmp_path)
    res = daemon.ctr("namespaces", "rm", ns, check=False)
    assert res.returncode != 0
    assert "failed precondition" in res.stderr, res.stderr
    for kind in ("images", "blobs", 'snapshots on "overlayfs" snapshotter'):
        assert kind in res.stderr, res.stderr
    assert ns in daemon.ctr("namespaces", "ls", "-q").stdout.split()
    daemon.ctr("images", "rm", "--sync", ref, namespace=ns)
    daemon.ctr("namespaces", "rm", ns)
    assert ns not in daemon.ctr("namespaces", "ls", "-q").stdout.split()
