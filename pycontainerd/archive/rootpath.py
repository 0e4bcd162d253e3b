"""Resolve image-controlled paths inside a root directory, as if chrooted into it.

This is our version of continuity's ``fs.RootPath``: every component is looked up with
``lstat``; a symlink's target is re-read relative to the root (absolute targets restart at
the root, ``..`` stops at the root), and more than 255 symlink hops is an error. The walk is
iterative, so a path of thousands of components costs no recursion, only a clean
``ENAMETOOLONG`` from the kernel. Components that do not exist yet are kept as plain names,
so callers can create them. Nothing is cached between calls: an archive may replace a
directory by a symlink at any point (CVE-2025-47290), so each entry is resolved afresh.

Any image-derived path used for a host-side file operation must go through here.
"""

from __future__ import annotations

import os
import stat

from pycontainerd.archive.errors import ArchiveError, InvalidArchive

__all__ = ["MAX_SYMLINK_HOPS", "clean_components", "hardlink_root_path", "root_path"]

MAX_SYMLINK_HOPS = 255


def clean_components(name: str) -> list[str]:
    """Split ``name`` into components, lexically cleaned and clamped at the root.

    ``/../x``, ``../x`` and ``a/../../x`` all give ``["x"]``; ``.`` and ``/`` give ``[]``
    (the root itself). This is ``filepath.Clean`` followed by the root clamp RootPath does.
    """
    out: list[str] = []
    for part in name.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if out:
                out.pop()
            continue
        out.append(part)
    return out


def _join(root: str, parts: list[str]) -> str:
    return root if not parts else root + "/" + "/".join(parts)


def root_path(root: str, path: str | list[str]) -> str:
    """Return ``root/<path>`` with every symlink in ``path`` resolved inside ``root``.

    The final component is followed too when it is a symlink (use it for parents; the
    caller appends the base name unresolved). ``root`` must be an absolute, clean path.
    Raises :class:`InvalidArchive` after too many symlink hops, :class:`ArchiveError` when
    a component cannot be inspected (e.g. ``ENAMETOOLONG``).
    """
    parts = clean_components(path) if isinstance(path, str) else list(path)
    pending = parts[::-1]  # a stack: next component at the end
    resolved: list[str] = []
    missing = False
    hops = 0
    while pending:
        part = pending.pop()
        if part == "..":
            if resolved:
                resolved.pop()
            # Popping back may land on existing components again: look them up.
            missing = False
            continue
        if missing:
            # Below a missing component nothing can exist, let alone a symlink.
            resolved.append(part)
            continue
        candidate = _join(root, [*resolved, part])
        try:
            st = os.lstat(candidate)
        except (FileNotFoundError, NotADirectoryError):
            # Not there (yet): treat as a plain name, as continuity does.
            resolved.append(part)
            missing = True
            continue
        except OSError as exc:
            raise ArchiveError(f"failed to resolve {candidate!r}: {exc.strerror}") from exc
        if not stat.S_ISLNK(st.st_mode):
            resolved.append(part)
            continue
        hops += 1
        if hops > MAX_SYMLINK_HOPS:
            raise InvalidArchive(f"failed to resolve {_join(root, parts)!r}: too many links")
        try:
            target = os.readlink(candidate)
        except OSError as exc:
            raise ArchiveError(f"failed to read link {candidate!r}: {exc.strerror}") from exc
        if target.startswith("/"):
            resolved = []
        for comp in reversed(target.split("/")):
            if comp not in ("", "."):
                pending.append(comp)
    return _join(root, resolved)


def hardlink_root_path(root: str, linkname: str) -> str:
    """Resolve a hardlink target: parent scoped by :func:`root_path`, base not followed.

    So a hardlink to a symlink links the symlink inode itself (never its host target),
    which is what stops CVE-2021-32760. A target resolving to the root is refused.
    """
    parts = clean_components(linkname)
    if not parts:
        raise InvalidArchive(f"hardlink target {linkname!r} resolves to the root")
    return root_path(root, parts[:-1]) + "/" + parts[-1]
