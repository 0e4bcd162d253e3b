"""A strict, streaming tar reader: ``tarfile`` parses the 512-byte blocks, we do the rest.

Why not ``TarFile.next()``: on the CPython we run (3.11.7) it treats a corrupt header in
the middle of an archive as a clean end, recurses once per chained extended header, reads
extended headers of any declared size into memory, and parses PAX records with the regular
expressions behind CVE-2024-6232. So only :meth:`tarfile.TarInfo.frombuf` (checksum and
field decoding of one ustar/GNU block) is used; framing, PAX records, GNU long names and
data are handled here in linear time with these rules, taken from Go's ``archive/tar``:

- extended headers (PAX ``x``, GNU ``L``/``K``) are limited to 1 MiB; a later PAX header
  replaces an earlier one, a GNU long name wins over a PAX path; PAX global headers (``g``)
  are parsed, then ignored (containerd ignores them too);
- header-only types (links, dirs, devices, fifos) carry no data whatever their size says;
- a zero block or EOF on a block boundary ends the archive; anything else short is an error;
- GNU sparse files are refused rather than expanded.
"""

from __future__ import annotations

import tarfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from pycontainerd.archive.errors import InvalidArchive

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["BLOCK", "MAX_SPECIAL_SIZE", "Header", "TarReader"]

BLOCK = 512
MAX_SPECIAL_SIZE = 1 << 20
_CHUNK = 1 << 20
_HEADER_ONLY = frozenset(
    {
        tarfile.LNKTYPE,
        tarfile.SYMTYPE,
        tarfile.CHRTYPE,
        tarfile.BLKTYPE,
        tarfile.DIRTYPE,
        tarfile.FIFOTYPE,
    }
)
_XATTR_PREFIX = "SCHILY.xattr."
_ZERO_BLOCK = bytes(BLOCK)


class _Source(Protocol):
    def read(self, n: int, /) -> bytes: ...


@dataclass(slots=True)
class Header:
    """One archive member, with PAX/GNU extensions already merged in."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    linkname: str
    devmajor: int
    devminor: int
    mtime_ns: int
    atime_ns: int | None
    xattrs: dict[str, bytes] = field(default_factory=dict)


def _parse_pax(data: bytes) -> dict[str, bytes]:
    """Parse ``"%d %s=%s\\n"`` records in one pass, rejecting anything malformed."""
    records: dict[str, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        space = data.find(b" ", pos, min(end, pos + 21))
        digits = data[pos:space] if space > pos else b""
        if not digits.isdigit():
            raise InvalidArchive("invalid PAX record length")
        length = int(digits)
        if length <= len(digits) + 1 or pos + length > end:
            raise InvalidArchive("invalid PAX record length")
        record = data[space + 1 : pos + length]
        eq = record.find(b"=")
        if eq <= 0 or not record.endswith(b"\n"):
            raise InvalidArchive("invalid PAX record")
        records[record[:eq].decode("utf-8", "surrogateescape")] = record[eq + 1 : -1]
        pos += length
    return records


def _pax_int(records: dict[str, bytes], key: str, default: int) -> int:
    raw = records.get(key)
    if raw is None:
        return default
    if not raw.isdigit() or len(raw) > 20:
        raise InvalidArchive(f"invalid PAX {key} {raw[:32]!r}")
    return int(raw)


def _pax_time_ns(raw: bytes) -> int | None:
    """PAX ``[-]seconds[.fraction]`` to integer nanoseconds; None when unparseable."""
    text = raw.decode("ascii", "replace")
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or len(whole) > 19 or (frac and not frac.isdigit()):
        return None
    ns = int(whole) * 1_000_000_000 + int((frac[:9] or "0").ljust(9, "0"))
    return -ns if negative else ns


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


class TarReader:
    """Iterate members of an uncompressed tar stream; read each member's data in turn."""

    def __init__(self, src: _Source) -> None:
        self._src = src
        # Read-ahead buffer consumed by offset: slicing off the front of a 1 MiB buffer
        # for every 512-byte header would copy it once per member.
        self._buf = b""
        self._pos = 0
        self._remaining = 0  # data bytes of the current member not read yet
        self._padding = 0

    def _take(self, n: int) -> bytes:
        out = self._buf[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def _read_exact(self, n: int) -> bytes:
        """``n`` bytes, or fewer only at the end of the stream."""
        if len(self._buf) - self._pos >= n:
            return self._take(n)
        parts = [self._buf[self._pos :]]
        have = len(parts[0])
        self._buf, self._pos = b"", 0
        while have < n:
            more = self._src.read(max(_CHUNK, n - have))
            if not more:
                break
            parts.append(more)
            have += len(more)
        data = b"".join(parts)
        if len(data) > n:
            self._buf = data
            return self._take(n)
        return data

    def _skip(self, n: int) -> None:
        while n > 0:
            chunk = self._read_exact(min(n, _CHUNK))
            if not chunk:
                raise InvalidArchive("unexpected EOF in tar data")
            n -= len(chunk)

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes of the current member (b"" at its end); EOF is an error."""
        n = min(n, self._remaining)
        if n <= 0:
            return b""
        # Bulk file data goes straight from the source when the read-ahead is used up.
        out = self._take(n) if self._pos < len(self._buf) else self._src.read(n)
        if not out:
            raise InvalidArchive("unexpected EOF in tar data")
        self._remaining -= len(out)
        return out

    def _special(self, info: tarfile.TarInfo) -> bytes:
        if not 0 <= info.size <= MAX_SPECIAL_SIZE:
            raise InvalidArchive(f"extended header of {info.size} bytes exceeds 1 MiB")
        data = self._read_exact(info.size)
        pad = -info.size % BLOCK
        if len(data) != info.size or len(self._read_exact(pad)) != pad:
            raise InvalidArchive("unexpected EOF in extended header")
        return data

    def next(self) -> Header | None:
        """The next member's header, or None at the end of the archive."""
        self._skip(self._remaining + self._padding)
        self._remaining = self._padding = 0
        pax: dict[str, bytes] = {}
        long_name: str | None = None
        long_link: str | None = None
        pending = False  # an extended header promised a following member
        while True:
            block = self._read_exact(BLOCK)
            if not block or block == _ZERO_BLOCK:
                if pending:
                    raise InvalidArchive("unexpected end of archive after extended header")
                return None
            if len(block) != BLOCK:
                raise InvalidArchive("unexpected EOF in tar header")
            try:
                info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            except tarfile.HeaderError as exc:
                raise InvalidArchive(f"invalid tar header: {exc}") from exc
            kind = info.type
            if kind == tarfile.XHDTYPE or kind == tarfile.SOLARIS_XHDTYPE:
                pax = _parse_pax(self._special(info))
                pending = True
            elif kind == tarfile.XGLTYPE:
                _parse_pax(self._special(info))
            elif kind == tarfile.GNUTYPE_LONGNAME:
                long_name = _text(self._special(info).split(b"\0", 1)[0])
                pending = True
            elif kind == tarfile.GNUTYPE_LONGLINK:
                long_link = _text(self._special(info).split(b"\0", 1)[0])
                pending = True
            else:
                return self._member(info, pax, long_name, long_link)

    def _member(
        self,
        info: tarfile.TarInfo,
        pax: dict[str, bytes],
        long_name: str | None,
        long_link: str | None,
    ) -> Header:
        if info.type == tarfile.GNUTYPE_SPARSE or any(k.startswith("GNU.sparse.") for k in pax):
            raise InvalidArchive(f"{info.name!r}: sparse files are not supported")
        name = _text(pax["path"]) if "path" in pax else info.name
        linkname = _text(pax["linkpath"]) if "linkpath" in pax else info.linkname
        if long_name is not None:
            name = long_name
        if long_link is not None:
            linkname = long_link
        size = _pax_int(pax, "size", info.size)
        if size < 0:
            raise InvalidArchive(f"{name!r}: negative size {size}")
        mtime_ns = int(info.mtime) * 1_000_000_000
        if "mtime" in pax:
            mtime_ns = _pax_time_ns(pax["mtime"]) or 0
        atime_ns = _pax_time_ns(pax["atime"]) if "atime" in pax else None
        xattrs = {k[len(_XATTR_PREFIX) :]: v for k, v in pax.items() if k.startswith(_XATTR_PREFIX)}
        hdr = Header(
            name=name,
            type=info.type,
            mode=info.mode & 0o7777,
            uid=_pax_int(pax, "uid", info.uid),
            gid=_pax_int(pax, "gid", info.gid),
            size=size,
            linkname=linkname,
            devmajor=info.devmajor,
            devminor=info.devminor,
            mtime_ns=mtime_ns,
            atime_ns=atime_ns,
            xattrs=xattrs,
        )
        self._remaining = 0 if info.type in _HEADER_ONLY else size
        self._padding = -self._remaining % BLOCK
        return hdr

    def drain(self, check: Callable[[], None] | None = None) -> int:
        """Consume everything after the archive end (it still counts for the digest)."""
        n = len(self._buf) - self._pos
        self._buf, self._pos = b"", 0
        while True:
            if check is not None:
                check()
            chunk = self._src.read(_CHUNK)
            if not chunk:
                return n
            n += len(chunk)
