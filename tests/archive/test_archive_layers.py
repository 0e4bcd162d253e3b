"""Multi-layer unpacking in both modes, and apply → diff → apply round trips."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from typing import TYPE_CHECKING

import pytest

from pycontainerd.archive import (
    ArchiveError,
    apply_layer,
    copy_implied_parents,
    drop_overlay_markers,
    write_diff,
)

if TYPE_CHECKING:
    from pathlib import Path

CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"


def layers(tar) -> list[bytes]:
    t1 = tar()
    t1.dir("etc").file("etc/passwd", b"root:x:0:0").file("etc/shadow", b"s", 0o640, gid=42)
    t1.dir("bin").file("bin/busybox", b"bb" * 100, 0o755).symlink("bin/sh", "busybox")
    t1.link("bin/ls", "bin/busybox", 0o755)
    t1.file("bin/su", b"su", 0o4755).file("bin/sg", b"sg", 0o2755, gid=50)
    t1.dir("tmp", 0o1777)
    t1.dir("opaque").file("opaque/a", b"a").dir("opaque/sub").file("opaque/sub/b", b"b")
    t1.dir("del").file("del/me", b"gone soon").file("keep", b"k")
    cap = t1.xattrs(security__capability=CAP.decode("utf-8", "surrogateescape"))
    t1.dir("cap").file("cap/ping", b"ping", 0o755, pax_headers={**cap, **t1.xattrs(user__c="hi")})
    t1.dir("dev").node("dev/null", tarfile.CHRTYPE, 1, 3).node("dev/sda", tarfile.BLKTYPE, 8, 0)
    t1.node("dev/fifo", tarfile.FIFOTYPE)
    t1.dir("recreated").file("recreated/old", b"old")

    t2 = tar()
    t2.dir("etc").file("etc/passwd", b"root:x:0:0\nuser:x:1000:1000", mtime=1_700_000_000)
    t2.dir("del").file("del/.wh.me")
    t2.dir("opaque").file("opaque/.wh..wh..opq").file("opaque/new", b"n")
    t2.file(".wh.recreated")
    # An implied parent: overlay mode copies etc's attributes from the lower layer.
    t2.file("newdir/implied/file", b"x")

    t3 = tar()
    t3.dir("recreated", 0o700).file("recreated/fresh", b"fresh")
    t3.dir("tmp", 0o1777).file("tmp/.wh.nothing-here")
    return [t1.bytes(), t2.bytes(), t3.bytes()]


def member_names(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        return tf.getnames()


def check_merged(view: Path) -> None:
    assert (view / "etc/passwd").read_bytes() == b"root:x:0:0\nuser:x:1000:1000"
    assert not (view / "del/me").exists()
    assert (view / "del").is_dir()
    assert sorted(os.listdir(view / "opaque")) == ["new"]
    assert sorted(os.listdir(view / "recreated")) == ["fresh"]
    assert stat.S_IMODE(os.lstat(view / "recreated").st_mode) == 0o700
    assert stat.S_IMODE(os.lstat(view / "bin/su").st_mode) == 0o4755
    st = os.lstat(view / "bin/sg")
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o2755, 50)
    assert stat.S_IMODE(os.lstat(view / "tmp").st_mode) == 0o1777
    assert os.readlink(view / "bin/sh") == "busybox"
    ls, bb = os.lstat(view / "bin/ls"), os.lstat(view / "bin/busybox")
    assert ls.st_nlink == bb.st_nlink == 2
    assert os.getxattr(view / "cap/ping", "security.capability") == CAP
    assert os.getxattr(view / "cap/ping", "user.c") == b"hi"
    null = os.lstat(view / "dev/null")
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    sda = os.lstat(view / "dev/sda")
    assert stat.S_ISBLK(sda.st_mode) and (os.major(sda.st_rdev), os.minor(sda.st_rdev)) == (8, 0)
    assert stat.S_ISFIFO(os.lstat(view / "dev/fifo").st_mode)
    assert (view / "newdir/implied/file").read_bytes() == b"x"
    assert not (view / "tmp/nothing-here").exists()


def test_layers_naive(tar, tmp_path: Path, snapshot_tree) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for data in layers(tar):
        result = apply_layer(root, io.BytesIO(data), overlay=False)
        assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
        assert result.size == len(data)
    check_merged(root)
    assert not any(name.startswith(".wh.") for _, _, files in os.walk(root) for name in files)


def test_layers_overlay_matches_naive(tar, tmp_path: Path, overlay_view, snapshot_tree) -> None:
    data = layers(tar)
    naive = tmp_path / "naive"
    naive.mkdir()
    for layer in data:
        apply_layer(naive, io.BytesIO(layer), overlay=False)
    uppers: list[Path] = []
    for i, layer in enumerate(data):
        upper = tmp_path / f"upper{i}"
        upper.mkdir()
        apply_layer(upper, io.BytesIO(layer), overlay=True, lower_dirs=list(reversed(uppers)))
        uppers.append(upper)
    # The upperdirs hold overlay's own whiteout format, never the .wh. markers.
    wh = os.lstat(uppers[1] / "del/me")
    assert stat.S_ISCHR(wh.st_mode) and wh.st_rdev == 0
    assert os.getxattr(uppers[1] / "opaque", "trusted.overlay.opaque") == b"y"
    assert not (uppers[1] / "opaque/.wh..wh..opq").exists()
    assert not (uppers[1] / "del/.wh.me").exists()
    # Implied parents copy a lower layer's directory when there is one, else 0755 root.
    assert stat.S_IMODE(os.lstat(uppers[1] / "newdir").st_mode) == 0o755
    merged = overlay_view(list(reversed(uppers)))
    check_merged(merged)
    assert snapshot_tree(merged) == snapshot_tree(naive)


def test_implied_parent_copies_lower_attributes(tar, tmp_path: Path) -> None:
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    apply_layer(lower, io.BytesIO(tar().dir("srv", 0o710, uid=7, gid=8).bytes()), overlay=True)
    os.setxattr(lower / "srv", "user.x", b"1")
    os.setxattr(lower / "srv", "trusted.overlay.origin", b"o")
    apply_layer(
        upper, io.BytesIO(tar().file("srv/f", b"f").bytes()), overlay=True, lower_dirs=[lower]
    )
    st = os.lstat(upper / "srv")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o710, 7, 8)
    assert os.getxattr(upper / "srv", "user.x") == b"1"
    assert "trusted.overlay.origin" not in os.listxattr(upper / "srv")


def test_round_trip_full_layer(tar, tmp_path: Path, snapshot_tree) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    apply_layer(first, io.BytesIO(layers(tar)[0]), overlay=False)
    out = io.BytesIO()
    write_diff(None, first, out, overlay_upper=False)
    result = apply_layer(second, io.BytesIO(out.getvalue()), overlay=False)
    assert snapshot_tree(second, dir_times=True) == snapshot_tree(first, dir_times=True)
    # Deterministic: the same tree gives the same layer.
    again = io.BytesIO()
    write_diff(None, second, again, overlay_upper=False)
    assert result.digest == "sha256:" + hashlib.sha256(again.getvalue()).hexdigest()


def test_round_trip_two_tree_diff(tar, tmp_path: Path, snapshot_tree) -> None:
    data = layers(tar)
    lower, upper, target = tmp_path / "lower", tmp_path / "upper", tmp_path / "target"
    for d in (lower, upper, target):
        d.mkdir()
        apply_layer(d, io.BytesIO(data[0]), overlay=False)
    for layer in data[1:]:
        apply_layer(upper, io.BytesIO(layer), overlay=False)
    out = io.BytesIO()
    write_diff(lower, upper, out, overlay_upper=False)
    names = member_names(out.getvalue())
    assert "del/.wh.me" in names
    assert "bin/busybox" not in names  # unchanged files are not in the diff
    apply_layer(target, io.BytesIO(out.getvalue()), overlay=False)
    assert snapshot_tree(target) == snapshot_tree(upper)


def test_round_trip_overlay_upper(tar, tmp_path: Path, snapshot_tree) -> None:
    data = layers(tar)
    naive, upper, target = tmp_path / "naive", tmp_path / "upper", tmp_path / "target"
    for d in (naive, upper, target):
        d.mkdir()
    for layer in data[:2]:
        apply_layer(naive, io.BytesIO(layer), overlay=False)
    apply_layer(target, io.BytesIO(data[0]), overlay=False)
    apply_layer(upper, io.BytesIO(data[1]), overlay=True)
    out = io.BytesIO()
    write_diff(None, upper, out, overlay_upper=True)
    names = member_names(out.getvalue())
    assert "opaque/.wh..wh..opq" in names
    assert ".wh.recreated" in names
    assert "del/.wh.me" in names
    apply_layer(target, io.BytesIO(out.getvalue()), overlay=False)
    assert snapshot_tree(target) == snapshot_tree(naive)


def test_deferred_parents_match_a_direct_apply(tar, snapshot_tree, tmp_path: Path) -> None:
    """A layer applied before its lower layers are known (``defer_parents``), then given
    their attributes (``copy_implied_parents``), is the layer applied onto them directly:
    implied parents copy the lower directory, keep their new mtime, and a directory made
    inside a setgid parent takes the parent's group."""
    lower = tmp_path / "lower"
    lower.mkdir()
    base = tar().dir("srv").dir("srv/shared", mode=0o2775, gid=50)
    base.dir("srv/private", mode=0o700, uid=1000, gid=1000)
    apply_layer(lower, io.BytesIO(base.bytes()), overlay=False)
    os.setxattr(lower / "srv/shared", "user.kind", b"shared")
    top = tar().file("srv/shared/deep/f", b"f").file("srv/private/g", b"g", uid=1000)
    top.file("new/dir/h", b"h").dir("srv/listed", mode=0o750).file("srv/listed/i", b"i")
    # Listed setgid before a child directory is made in it, and listed setgid only after:
    # the child takes the group in the first case only.
    top.dir("early", mode=0o2775, gid=60).file("early/kid/f", b"f")
    top.file("late/kid/f", b"f").dir("late", mode=0o2775, gid=70)
    data = top.bytes()

    direct, staged = tmp_path / "direct", tmp_path / "staged"
    direct.mkdir()
    staged.mkdir()
    want = apply_layer(direct, io.BytesIO(data), overlay=True, lower_dirs=[lower])
    got = apply_layer(staged, io.BytesIO(data), overlay=True, defer_parents=True)
    assert got.digest == want.digest
    assert set(got.implied) == {
        "srv", "srv/shared", "srv/shared/deep", "srv/private", "new", "new/dir",
        "early/kid", "late", "late/kid",
    }  # fmt: skip
    assert got.relisted == {"late"}
    assert snapshot_tree(staged) != snapshot_tree(direct)  # before the fix-up
    copy_implied_parents(staged, got.implied, [lower], got.relisted)
    assert snapshot_tree(staged) == snapshot_tree(direct)
    assert os.lstat(staged / "early/kid").st_gid == 60
    assert os.lstat(staged / "late/kid").st_gid == 0
    st = os.lstat(staged / "srv/shared/deep")
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o755, 50)
    assert os.getxattr(staged / "srv/shared", "user.kind") == b"shared"


def test_overlay_form_becomes_a_first_layer(tar, snapshot_tree, tmp_path: Path) -> None:
    """A layer unpacked in overlay form before anyone says it is a first layer, with its
    whiteouts and opaque markers dropped, is the naive apply onto an empty directory."""
    layer = tar().dir("a").file("a/keep", b"k").file("a/gone", b"g").file("a/.wh.gone")
    layer.file("a/.wh.never-there").dir("b").file("b/.wh..wh..opq").file("b/f", b"f")
    layer.file("c/.wh.x").file("c/x", b"recreated after its whiteout")
    data = layer.bytes()
    naive, staged = tmp_path / "naive", tmp_path / "staged"
    naive.mkdir()
    staged.mkdir()
    want = apply_layer(naive, io.BytesIO(data), overlay=False)
    got = apply_layer(staged, io.BytesIO(data), overlay=True, defer_parents=True)
    assert got.digest == want.digest
    assert got.whiteouts == {"a/gone", "a/never-there"} and got.opaques == {"b"}
    assert got.markers_droppable
    assert snapshot_tree(staged) != snapshot_tree(naive)  # devices and markers
    drop_overlay_markers(staged, got)
    assert snapshot_tree(staged) == snapshot_tree(naive)
    assert "trusted.overlay.opaque" not in os.listxattr(staged / "b")


def test_opaque_marker_after_implied_dirs_is_not_droppable(tar, tmp_path: Path) -> None:
    """A naive opaque marker deletes directories the layer only implied before it: the
    overlay form cannot say that, so it refuses to turn into a first layer."""
    data = tar().file("a/b/f", b"f").file("a/.wh..wh..opq").bytes()
    naive, staged = tmp_path / "naive", tmp_path / "staged"
    naive.mkdir()
    staged.mkdir()
    apply_layer(naive, io.BytesIO(data), overlay=False)
    assert not (naive / "a/b").exists()  # the naive marker took the implied a/b
    got = apply_layer(staged, io.BytesIO(data), overlay=True, defer_parents=True)
    assert not got.markers_droppable
    with pytest.raises(ArchiveError):
        drop_overlay_markers(staged, got)
