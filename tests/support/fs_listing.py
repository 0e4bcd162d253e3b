"""List a real directory tree (e.g. a mounted image) in a form comparable with a model.

`listing(root)` walks a tree without following symlinks and describes every entry below
`root` by its relative POSIX path: type, permission bits (with setuid/setgid/sticky),
owner, size and content digest of regular files, symlink target, device numbers, user
xattrs, mtime, and which paths share an inode. `tests.support.images.expected_tree`
returns the same `Entry` type, so `diff_trees(expected, listing(dir))` shows how a
mounted image differs from what its layers should produce.
"""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from pathlib import Path

__all__ = ["USER_XATTR_PREFIX", "Entry", "EntryType", "diff_trees", "link_groups", "listing"]

EntryType = Literal["file", "dir", "symlink", "char", "block", "fifo", "socket"]

# Only the user namespace is compared: overlayfs hides trusted.overlay.* in a merged view,
# and security.* is owned by the kernel (LSMs), not by the image.
USER_XATTR_PREFIX = "user."


@dataclass(frozen=True, slots=True)
class Entry:
    """One path of a tree.

    `mode` is `stat.S_IMODE` (permissions plus setuid, setgid and sticky bits); symlinks
    always carry 0o777 as Linux reports. `size` and `sha256` are set for regular files
    only, `target` for symlinks, `rdev` (major, minor) for devices. `mtime_ns` None means
    "unknown" (a model that cannot know it); comparisons skip it. `link_group` is the
    smallest path of the set of paths sharing this inode, or None when no other listed
    path shares it.
    """

    type: EntryType
    mode: int
    uid: int = 0
    gid: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""
    rdev: tuple[int, int] | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime_ns: int | None = None
    link_group: str | None = None


def _user_xattrs(path: str) -> tuple[tuple[str, bytes], ...]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return ()
    out = [
        (name, os.getxattr(path, name, follow_symlinks=False))
        for name in names
        if name.startswith(USER_XATTR_PREFIX)
    ]
    return tuple(sorted(out))


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _type_of(mode: int) -> EntryType:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISCHR(mode):
        return "char"
    if stat.S_ISBLK(mode):
        return "block"
    if stat.S_ISFIFO(mode):
        return "fifo"
    return "socket"


def _describe(path: str, st: os.stat_result) -> Entry:
    kind = _type_of(st.st_mode)
    return Entry(
        type=kind,
        mode=0o777 if kind == "symlink" else stat.S_IMODE(st.st_mode),
        uid=st.st_uid,
        gid=st.st_gid,
        size=st.st_size if kind == "file" else 0,
        sha256=_file_sha256(path) if kind == "file" else "",
        target=os.readlink(path) if kind == "symlink" else "",
        rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if kind in ("char", "block") else None,
        xattrs=_user_xattrs(path) if kind in ("file", "dir") else (),
        mtime_ns=st.st_mtime_ns,
    )


def link_groups(inodes: Iterable[tuple[str, object]]) -> dict[str, str]:
    """Map each path that shares its inode key with another path to the group's smallest path."""
    by_key: dict[object, list[str]] = {}
    for path, key in inodes:
        by_key.setdefault(key, []).append(path)
    groups: dict[str, str] = {}
    for paths in by_key.values():
        if len(paths) > 1:
            first = min(paths)
            for p in paths:
                groups[p] = first
    return groups


def listing(root: Path) -> dict[str, Entry]:
    """Describe every entry below `root` (not `root` itself), keyed by relative POSIX path.

    Symlinks are never followed. Hardlinks are found by (st_dev, st_ino) among non-directory
    entries of this tree, so a link whose partner is hidden (e.g. by a whiteout) stands alone.
    """
    entries: dict[str, Entry] = {}
    inodes: list[tuple[str, object]] = []
    stack = [(str(root), "")]
    while stack:
        abs_dir, rel_dir = stack.pop()
        with os.scandir(abs_dir) as it:
            children = sorted(it, key=lambda d: d.name)
        for child in children:
            rel = f"{rel_dir}{child.name}"
            st = child.stat(follow_symlinks=False)
            entry = _describe(child.path, st)
            entries[rel] = entry
            if entry.type == "dir":
                stack.append((child.path, rel + "/"))
            else:
                inodes.append((rel, (st.st_dev, st.st_ino)))
    groups = link_groups(inodes)
    for path, first in groups.items():
        entries[path] = replace(entries[path], link_group=first)
    return dict(sorted(entries.items()))


def diff_trees(
    expected: Mapping[str, Entry],
    actual: Mapping[str, Entry],
    *,
    ignore: Iterable[str] = (),
    ignore_dir_mtime: bool = False,
) -> list[str]:
    """Readable differences between two trees; empty when they match.

    `ignore` names Entry fields not to compare. An expected `mtime_ns` of None is not
    compared; `ignore_dir_mtime` skips directory mtimes (they move when entries are added
    below a directory after its own header was applied).
    """
    skip = set(ignore)
    out: list[str] = []
    for path in sorted(set(expected) - set(actual)):
        out.append(f"missing: {path} ({expected[path].type})")
    for path in sorted(set(actual) - set(expected)):
        out.append(f"unexpected: {path} ({actual[path].type})")
    for path in sorted(set(expected) & set(actual)):
        want, got = expected[path], actual[path]
        for f in fields(Entry):
            if f.name in skip:
                continue
            w, g = getattr(want, f.name), getattr(got, f.name)
            if f.name == "mtime_ns" and (w is None or (ignore_dir_mtime and want.type == "dir")):
                continue
            if w != g:
                shown = (oct(w), oct(g)) if f.name == "mode" else (w, g)
                out.append(f"{path}: {f.name} expected {shown[0]!r}, got {shown[1]!r}")
    return out
