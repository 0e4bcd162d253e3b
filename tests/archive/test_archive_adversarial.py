"""Hostile layers (reliability.md §1.4, items 1-21), in both unpack modes.

Every test uses the ``sentinel`` fixture: a host file and directory outside the root that
must keep content, mode, owner, mtime and link count. The accepted outcomes are
containerd's (contained inside the root) or moby's (a clean ArchiveError).
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
import threading
from typing import TYPE_CHECKING

import pytest

from pycontainerd.archive import ArchiveCanceled, ArchiveError, InvalidArchive

if TYPE_CHECKING:
    from pathlib import Path


def inside(top: Path, host_path: Path | str) -> Path:
    """Where an absolute host path lands when scoped into ``top``."""
    return top / str(host_path).lstrip("/")


def try_apply(stack, data: bytes) -> ArchiveError | None:
    try:
        stack.apply(data)
    except ArchiveError as exc:
        return exc
    return None


def special(kind: bytes, body: bytes, name: str = "././@Ext") -> bytes:
    """A raw extended header block followed by its padded body."""
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(body)
    return info.tobuf(tarfile.USTAR_FORMAT) + body + bytes(-len(body) % 512)


def plain(name: str, data: bytes = b"", **kw) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in kw.items():
        setattr(info, key, value)
    return info.tobuf(tarfile.GNU_FORMAT) + data + bytes(-len(data) % 512)


END = bytes(1024)
# A valid VFS_CAP_REVISION_2 value (cap_net_raw): the kernel rejects malformed ones.
CAP = b"\x01\x00\x00\x02\x00\x20\x00\x00" + bytes(12)


# 1
def test_name_traversal(stack, tar, sentinel) -> None:
    t = tar()
    t.file("../victim/dotdot", b"1").file("/../victim/slash-dotdot", b"2")
    t.file("a/../../victim/x", b"3").file("./../../x", b"4")
    t.file("../" * 12 + str(sentinel.dir).lstrip("/") + "/deep", b"5")
    stack.apply(t.bytes())
    assert (stack.top / "victim/dotdot").read_bytes() == b"1"
    assert (stack.top / "victim/slash-dotdot").read_bytes() == b"2"
    assert (stack.top / "victim/x").read_bytes() == b"3"
    assert (stack.top / "x").read_bytes() == b"4"
    assert (inside(stack.top, sentinel.dir) / "deep").read_bytes() == b"5"


# 2
@pytest.mark.parametrize("variant", ["absolute", "dotdot", "chain"])
def test_absolute_symlink_parent(stack, tar, sentinel, variant) -> None:
    victim = str(sentinel.dir)
    t = tar().dir("etc")
    if variant == "absolute":
        t.symlink("localetc", victim)
    elif variant == "dotdot":
        t.symlink("localetc", "/dummy/.." + victim)
    else:
        t.dir("dummy").symlink("dummy/etc", victim).symlink("localetc", "./dummy/etc")
    t.file("/localetc/unbroken", b"unbroken")
    stack.apply(t.bytes())
    assert (inside(stack.top, victim) / "unbroken").read_bytes() == b"unbroken"


# 3
def test_relative_escape_symlink_then_write(stack, tar, sentinel) -> None:
    escape = os.path.relpath(sentinel.dir, stack.top / "dir")
    t = tar().dir("dir").symlink("dir/loophole", escape)
    t.file("dir/loophole/newdir/newfile", b"x").file("dir/loophole/file", b"overwrite?")
    stack.apply(t.bytes())
    assert (stack.top / "victim/newdir/newfile").read_bytes() == b"x"
    assert (stack.top / "victim/file").read_bytes() == b"overwrite?"


# 4
def test_two_layer_symlink_attack(stack, tar, sentinel) -> None:
    stack.apply(tar().symlink("x", "../" * 8 + str(sentinel.dir).lstrip("/")).bytes())
    stack.apply(tar().file("x/pwned", b"p").file("x/sub/deeper", b"d").file("x/file", b"f").bytes())
    if stack.overlay:
        # Lower-layer symlinks are invisible in the upperdir: x becomes a real directory.
        assert (stack.top / "x").is_dir() and not (stack.top / "x").is_symlink()
        assert (stack.top / "x/pwned").read_bytes() == b"p"
    else:
        assert (inside(stack.top, sentinel.dir) / "pwned").read_bytes() == b"p"
        assert (inside(stack.top, sentinel.dir) / "sub/deeper").read_bytes() == b"d"


# 5
def test_hardlinks_to_host_paths(stack, tar, sentinel) -> None:
    mirror = str(sentinel.file).lstrip("/")
    t = tar().dir("etc").file("etc/passwd", b"inside").file(mirror, b"inside too")
    t.link("rel", "../../../../../etc/passwd").link("abs", "/etc/passwd")
    t.link("victimlink", str(sentinel.file), mode=0o777)
    t.link("victimrel", "../" * 10 + mirror, mode=0o777)
    stack.apply(t.bytes())
    local = os.lstat(stack.top / "etc/passwd")
    host = os.stat("/etc/passwd")
    for name in ("rel", "abs"):
        st = os.lstat(stack.top / name)
        assert (st.st_dev, st.st_ino) == (local.st_dev, local.st_ino)
        assert (st.st_dev, st.st_ino) != (host.st_dev, host.st_ino)
    for name in ("victimlink", "victimrel"):
        assert (stack.top / name).read_bytes() == b"inside too"


# 6
@pytest.mark.parametrize("target", ["../../etc", "../downandout/../../etc"])
def test_hardlink_through_symlinked_dir(stack, tar, sentinel, target) -> None:
    t = tar().dir("etc").file("etc/passwd", b"inside").dir("breakouts")
    t.symlink("breakouts/d1", target).link("breakouts/mypasswd", "/breakouts/d1/passwd")
    stack.apply(t.bytes())
    assert os.path.samefile(stack.top / "breakouts/mypasswd", stack.top / "etc/passwd")


# 7
def test_hardlink_to_symlink_then_chmod(stack, tar, sentinel) -> None:
    host_passwd = os.stat("/etc/passwd")
    t = tar().symlink("x", str(sentinel.file)).link("sketchylink", "x", mode=0o777)
    t.symlink("passwdlink", "/etc/passwd").link("localpasswd", "/passwdlink", mode=0o777)
    t.link("before", "later")  # target created later: clean error expected
    err = try_apply(stack, t.bytes())
    assert isinstance(err, ArchiveError)
    assert os.readlink(stack.top / "sketchylink") == str(sentinel.file)
    assert os.lstat(stack.top / "sketchylink").st_ino == os.lstat(stack.top / "x").st_ino
    assert os.readlink(stack.top / "localpasswd") == "/etc/passwd"
    after = os.stat("/etc/passwd")
    assert (after.st_mode, after.st_nlink) == (host_passwd.st_mode, host_passwd.st_nlink)


# 8
def test_directory_replaced_by_symlink_mid_archive(stack, tar, sentinel, tmp_path) -> None:
    t = tar().dir("foo").dir("foo/victim").file("foo/victim/f", b"A")
    t.symlink("foo", str(tmp_path)).file("foo/victim/f", b"B")
    t.dir("foo").file("foo/victim/f", b"C")
    stack.apply(t.bytes())
    assert (stack.top / "foo/victim/f").read_bytes() == b"C"
    assert (inside(stack.top, tmp_path) / "victim/f").read_bytes() == b"B"
    assert not (sentinel.dir / "f").exists()


# 9
def test_symlink_overrides_directory(stack, tar, sentinel) -> None:
    stack.apply(tar().dir("etc").file("etc/passwd", b"inside").dir("localetc").bytes())
    t = tar().symlink("localetc", str(sentinel.dir)).link("localetc/localpasswd", "/etc/passwd")
    t.file("localetc/file", b"overwrite?")
    err = try_apply(stack, t.bytes())
    if stack.overlay:
        assert isinstance(err, ArchiveError)  # etc/passwd is not in this upperdir
    else:
        assert err is None
        assert os.path.samefile(
            inside(stack.top, sentinel.dir) / "localpasswd", stack.top / "etc/passwd"
        )


def test_directory_overrides_symlink(stack, tar, sentinel) -> None:
    stack.apply(
        tar()
        .dir("etc")
        .file("etc/passwd", b"inside")
        .symlink("localetc", str(sentinel.dir))
        .bytes()
    )
    stack.apply(tar().dir("localetc").file("localetc/file", b"different").bytes())
    assert not (stack.top / "localetc").is_symlink()
    assert (stack.top / "localetc/file").read_bytes() == b"different"
    if not stack.overlay:
        assert (stack.top / "etc/passwd").read_bytes() == b"inside"


# 10
@pytest.mark.parametrize("name", [".wh..", ".wh...", "etc/.wh..", "etc/.wh...", ".wh."])
def test_invalid_whiteouts_fail(stack, tar, sentinel, name) -> None:
    stack.apply(tar().dir("etc").file("etc/passwd", b"inside").file("keep", b"k").bytes())
    err = try_apply(stack, tar().file(name).bytes())
    assert isinstance(err, InvalidArchive)
    assert "invalid whiteout name" in str(err)
    assert (stack.root / "etc/passwd").read_bytes() == b"inside"
    assert (stack.root / "keep").exists()


@pytest.mark.parametrize(
    "name", [".wh.localetc", "localetc/.wh.file", "dne/../.wh.etc", ".wh.etc/somefile"]
)
def test_contained_whiteouts(stack, tar, sentinel, name) -> None:
    mirror = str(sentinel.file).lstrip("/")
    base = tar().dir("etc").file("etc/x", b"x").file(mirror, b"mirror")
    stack.apply(base.symlink("localetc", str(sentinel.dir)).bytes())
    stack.apply(tar().file(name).bytes())
    top = stack.top
    if stack.overlay:
        target = {
            ".wh.localetc": "localetc",
            "localetc/.wh.file": "localetc/file",
            "dne/../.wh.etc": "etc",
        }.get(name)
        if target is not None:
            st = os.lstat(top / target)
            assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
        else:
            assert (top / ".wh.etc/somefile").is_file()
    elif name == ".wh.localetc":
        assert not os.path.lexists(top / "localetc")
    elif name == "localetc/.wh.file":
        assert not (top / mirror).exists()  # the root-scoped target, not the host file
    elif name == "dne/../.wh.etc":
        assert not (top / "etc").exists()
    else:
        assert (top / ".wh.etc/somefile").is_file() and (top / "etc/x").exists()


# 11
def test_forged_trusted_xattrs_are_skipped(stack, tar, sentinel) -> None:
    t = tar()
    x = t.xattrs
    t.dir("d", pax_headers=x(trusted__overlay__opaque="y", trusted__overlay__redirect="/../.."))
    cap = CAP.decode("utf-8", "surrogateescape")
    t.file(
        "f",
        b"f",
        pax_headers=x(
            trusted__overlay__origin="o",
            trusted__foo="bar",
            security__capability=cap,
            user__note="n",
        ),
    )
    t.symlink("l", "f", pax_headers=x(user__note="on a symlink"))
    stack.apply(t.bytes())
    for name in ("d", "f", "l"):
        assert not [
            k
            for k in os.listxattr(stack.top / name, follow_symlinks=False)
            if k.startswith("trusted.")
        ]
    assert os.getxattr(stack.top / "f", "security.capability") == CAP
    assert os.getxattr(stack.top / "f", "user.note") == b"n"


# 12
def test_device_nodes(stack, tar, sentinel) -> None:
    t = (
        tar()
        .node("c", tarfile.CHRTYPE, 1, 3)
        .node("b", tarfile.BLKTYPE, 8, 0)
        .node("p", tarfile.FIFOTYPE)
    )
    stack.apply(t.bytes())
    c, b, p = (os.lstat(stack.top / n) for n in "cbp")
    assert stat.S_ISCHR(c.st_mode) and (os.major(c.st_rdev), os.minor(c.st_rdev)) == (1, 3)
    assert stat.S_ISBLK(b.st_mode) and (os.major(b.st_rdev), os.minor(b.st_rdev)) == (8, 0)
    assert stat.S_ISFIFO(p.st_mode)
    assert stat.S_IMODE(c.st_mode) == 0o660


@pytest.mark.parametrize("major", [-1, 1 << 32])
def test_device_numbers_out_of_range(stack, tar, sentinel, major) -> None:
    t = tar(tarfile.GNU_FORMAT).node("bad", tarfile.BLKTYPE, major, 0)
    err = try_apply(stack, t.bytes())
    assert isinstance(err, InvalidArchive)
    assert not os.path.lexists(stack.top / "bad")


# 13
def test_special_mode_bits_survive_chown(stack, tar, sentinel) -> None:
    t = (
        tar()
        .dir("bin")
        .file("bin/su", b"su", 0o4755, uid=0)
        .file("bin/mine", b"m", 0o6750, uid=1000, gid=1000)
    )
    t.dir("dir", 0o1777).file("f", b"f", 0o2755, gid=50)
    stack.apply(t.bytes())
    modes = {n: os.lstat(stack.top / n) for n in ("bin/su", "bin/mine", "dir", "f")}
    assert stat.S_IMODE(modes["bin/su"].st_mode) == 0o4755
    assert (stat.S_IMODE(modes["bin/mine"].st_mode), modes["bin/mine"].st_uid) == (0o6750, 1000)
    assert stat.S_IMODE(modes["dir"].st_mode) == 0o1777
    assert (stat.S_IMODE(modes["f"].st_mode), modes["f"].st_gid) == (0o2755, 50)


# 14
def test_root_resolving_entries_are_ignored(stack, tar, sentinel) -> None:
    os.chmod(stack.root, 0o751)
    before = os.lstat(stack.root)
    t = tar().dir("./", 0o777, uid=1234).dir("/", 0o700).dir("..", 0o700).dir(".", 0o700)
    t.file("a/..", b"")  # a regular file whose name cleans to the root
    stack.apply(t.bytes())
    after = os.lstat(stack.root)
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode,
        before.st_uid,
        before.st_gid,
    )


# 15
def test_symlink_loop_in_parent(stack, tar, sentinel) -> None:
    t = tar().symlink("a", "b").symlink("b", "a").file("a/file", b"x")
    err = try_apply(stack, t.bytes())
    assert isinstance(err, InvalidArchive)
    assert "too many links" in str(err)


# 16
def test_header_declaring_more_data_than_present(stack, sentinel) -> None:
    data = plain("big", b"only this")[:512] + b"only this"
    info = tarfile.TarInfo("big")
    info.size = 1 << 40  # 1 TiB promised
    data = info.tobuf(tarfile.GNU_FORMAT) + b"only this"
    err = try_apply(stack, data)
    assert isinstance(err, InvalidArchive)
    assert "unexpected EOF" in str(err)


def test_cancel_stops_apply(stack, tar, sentinel) -> None:
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(ArchiveCanceled):
        stack.apply(tar().file("f", b"x").bytes(), cancel=cancel)
    assert not (stack.top / "f").exists()


# 17
def test_digest_includes_trailing_garbage(stack, tar, sentinel) -> None:
    data = tar().file("f", b"x").bytes() + b"trailing garbage after the end blocks" * 1000
    result = stack.apply(data)
    assert result.digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert result.size == len(data)


# 18
def test_bad_checksum_mid_archive_is_an_error(stack, tar, sentinel) -> None:
    data = bytearray(tar().file("a", b"a").file("b", b"b").bytes())
    second = 1024  # header, one data block, then the second header
    data[second + 148 : second + 156] = b"0000000\0"
    err = try_apply(stack, bytes(data))
    assert isinstance(err, InvalidArchive)
    assert "checksum" in str(err)


@pytest.mark.parametrize(
    "records",
    [
        b"0 path=x\n",  # CVE-2019-20907: zero-length record
        b"1099511627776 path=x\n",  # length far beyond the header
        b"9" * 30 + b" path=x\n",
        b"1" * 200_000 + b"\n",  # CVE-2024-6232-style pathological value
        b"12 size=-5\n",
        b"11 path=x\n",  # wrong length
    ],
)
def test_malformed_pax_records(stack, sentinel, records) -> None:
    data = special(tarfile.XHDTYPE, records) + plain("f", b"f") + END
    err = try_apply(stack, data)
    assert isinstance(err, InvalidArchive)


def test_oversized_gnu_long_name(stack, sentinel) -> None:
    data = special(tarfile.GNUTYPE_LONGNAME, b"a" * ((1 << 20) + 1)) + plain("f") + END
    err = try_apply(stack, data)
    assert isinstance(err, InvalidArchive)


def test_megabyte_gnu_long_name_is_a_clean_error(stack, sentinel) -> None:
    data = special(tarfile.GNUTYPE_LONGNAME, b"a" * (1 << 20)) + plain("f") + END
    err = try_apply(stack, data)
    assert isinstance(err, ArchiveError)


def test_negative_size(stack, sentinel) -> None:
    err = try_apply(stack, plain("neg", size=-1) + END)
    assert isinstance(err, InvalidArchive)


# 19
def test_three_thousand_component_path(stack, tar, sentinel) -> None:
    err = try_apply(stack, tar().file("a/" * 3000 + "f", b"deep").bytes())
    assert err is None or isinstance(err, ArchiveError)
    assert not isinstance(err, RecursionError)


def test_deep_tree_replaced_without_recursion(stack, tar, sentinel) -> None:
    deep = "d/" * 1500  # below PATH_MAX, deeper than Python's recursion limit
    stack.apply(tar().file(deep + "f", b"x").bytes())
    stack.apply(tar().file("d", b"now a file").bytes())
    assert (stack.top / "d").read_bytes() == b"now a file"


# 20
@pytest.mark.parametrize("kind", [b"Z", tarfile.GNUTYPE_SPARSE])
def test_unknown_or_sparse_types_fail(stack, sentinel, kind) -> None:
    err = try_apply(stack, plain("odd", b"data", type=kind) + END)
    assert isinstance(err, InvalidArchive)


def test_global_header_is_ignored(stack, sentinel) -> None:
    buf = io.BytesIO()
    with tarfile.open(
        fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"path": "evil"}
    ) as tf:
        info = tarfile.TarInfo("ok")
        tf.addfile(info, io.BytesIO(b""))
    assert buf.getvalue()[156:157] == tarfile.XGLTYPE
    stack.apply(buf.getvalue())
    assert (stack.top / "ok").exists()
    assert not (stack.top / "evil").exists()


def test_ordering_quirks(stack, tar, sentinel) -> None:
    t = tar().file("x", b"file first").dir("x", 0o700)
    t.dir("d", 0o700).file("d/keep", b"k").dir("d", 0o750, uid=5)
    stack.apply(t.bytes())
    assert (stack.top / "x").is_dir()
    st = os.lstat(stack.top / "d")
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o750, 5)
    assert (stack.top / "d/keep").read_bytes() == b"k"


# 21
def test_time_extremes(stack, tar, sentinel) -> None:
    t = tar().file("future", b"", mtime=253402300799).file("past", b"", mtime=-100)
    t.file("atime", b"", mtime=1_600_000_000, pax_headers={"atime": "1700000000.5"})
    t.dir("dir", mtime=253402300799).file("dir/f", b"")
    stack.apply(t.bytes())
    assert os.lstat(stack.top / "future").st_mtime_ns == 0
    assert os.lstat(stack.top / "past").st_mtime_ns == 0
    st = os.lstat(stack.top / "atime")
    assert st.st_mtime_ns == 1_600_000_000 * 10**9
    assert st.st_atime_ns == 1_700_000_000_500_000_000
    assert os.lstat(stack.top / "dir").st_mtime_ns == 0
